"""memplan fit / gpus / sweep: the answers are the largest that fit (checked against the estimate one step past
them), the changes really fit, the CSV schema is the documented one, and the error paths exit 2 with one line."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.catalog import resolve_gpu, resolve_model
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.estimate import estimate
from memplan.plan import (BATCH_CAP, SEQ_CAP, SEQ_STEP, TIERS, Budget, Searcher, fit, make_budget, parse_margin,
                          parse_size)
from memplan.report.rows import COLUMN_NAMES
from memplan.spec import TrainSpec

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def device(model, spec):
    return estimate(model, spec).device_total_bytes


# ------------------------------------------------------------------------------------------- sizes and margins


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * 2**30), ("24 GiB", 24 * 2**30), ("24gib", 24 * 2**30), ("24GB", 24 * 10**9),
    ("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29), ("80G", 80 * 2**30), ("1TiB", 2**40), ("100MB", 10**8),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["24", "GiB", "24 parsecs", "-1GiB", "0GiB", "", "24GiBs", "twelve GB"])
def test_parse_size_rejects(text):
    with pytest.raises(MemplanError):
        parse_size(text)


def test_parse_margin():
    b = 24 * GIB
    assert parse_margin("5%", b) == int(0.05 * b)
    assert parse_margin("0.1", b) == int(0.1 * b)
    assert parse_margin("0", b) == 0
    assert parse_margin("1GiB", b) == GIB
    for bad in ("150%", "2", "24GiB", "lots"):
        with pytest.raises(MemplanError):
            parse_margin(bad, b)


def test_make_budget():
    g = make_budget(gpu="4090")
    assert g.label == "rtx-4090" and g.total_bytes == resolve_gpu("rtx-4090").memory_bytes
    assert g.margin_bytes == int(0.05 * g.total_bytes)
    b = make_budget(budget="24GiB", margin="1GiB")
    assert b.usable_bytes == 23 * GIB
    with pytest.raises(MemplanError):
        make_budget()
    with pytest.raises(MemplanError):
        make_budget(gpu="4090", budget="24GiB")
    with pytest.raises(MemplanError, match="unknown GPU"):
        make_budget(gpu="rtx-9999")


# --------------------------------------------------------------------------------------------- the answers

CASES = [
    ("llama-3-8b", "rtx-4090", TrainSpec()),
    ("llama-3-8b", "rtx-4090", TrainSpec(bits=16, gradient_checkpointing=False)),
    ("llama-2-7b", "t4", TrainSpec(seq_len=1024, batch_size=2)),
    ("llama-2-70b", "a100-80gb", TrainSpec(seq_len=4096)),
    ("mistral-7b-v0.1", "rtx-3060", TrainSpec(attention="eager", seq_len=512)),
    ("qwen2.5-0.5b", "h100", TrainSpec(bits=16, optimizer="adamw-8bit")),
    ("mixtral-8x7b", "h200", TrainSpec()),
    ("qwen2.5-7b", "a10g", TrainSpec(method="full", bits=16, optimizer="sgd", seq_len=256)),
]


@pytest.mark.parametrize("model_name,gpu,spec", CASES, ids=[f"{m}-{g}" for m, g, _ in CASES])
def test_fit_answers_are_the_largest_that_fit(model_name, gpu, spec):
    model = resolve_model(model_name)
    budget = make_budget(gpu=gpu)
    usable = budget.usable_bytes
    r = fit(model, spec, budget)
    assert r.fits == (device(model, spec) <= usable)
    # largest sequence length at the given batch, at SEQ_STEP granularity
    if r.max_seq_len is None:
        assert device(model, spec.with_(seq_len=SEQ_STEP)) > usable
    else:
        assert r.max_seq_len % SEQ_STEP == 0
        assert device(model, spec.with_(seq_len=r.max_seq_len)) <= usable
        if r.max_seq_len < SEQ_CAP:
            assert device(model, spec.with_(seq_len=r.max_seq_len + SEQ_STEP)) > usable
    # largest batch at the given sequence length, exactly
    if r.max_batch_size is None:
        assert device(model, spec.with_(batch_size=1)) > usable
    else:
        assert device(model, spec.with_(batch_size=r.max_batch_size)) <= usable
        if r.max_batch_size < BATCH_CAP:
            assert device(model, spec.with_(batch_size=r.max_batch_size + 1)) > usable
    for f in r.frontier:
        s = spec.with_(batch_size=f["batch_size"])
        assert device(model, s.with_(seq_len=f["max_seq_len"])) <= usable
        assert device(model, s.with_(seq_len=f["max_seq_len"] + SEQ_STEP)) > usable or f["max_seq_len"] == SEQ_CAP
    assert r.configurations_searched >= 10_000


def test_searcher_bisection_is_exact_against_a_linear_scan():
    model = resolve_model("llama-3.2-1b")
    spec = TrainSpec(seq_len=1024)
    budget = Budget(8 * GIB, 0, "8GiB")
    s = Searcher(model, budget.usable_bytes)
    got = s.largest(spec, "batch_size", 1, 64)
    scan = [b for b in range(1, 65) if device(model, spec.with_(batch_size=b)) <= budget.usable_bytes]
    assert got == max(scan)
    assert s.estimated < 20  # bisection, not a scan


def test_options_when_it_does_not_fit():
    model = resolve_model("llama-3-8b")
    spec = TrainSpec(bits=16, gradient_checkpointing=False, batch_size=4, seq_len=4096, attention="eager")
    budget = make_budget(gpu="a100-80gb")
    r = fit(model, spec, budget)
    assert not r.fits and r.options
    keys = [o.key for o in r.options]
    assert keys == sorted(keys, key=TIERS.index)  # ranked cheapest first
    assert keys[0] == "sdpa" and "checkpointing" in keys and "micro-batch" in keys
    for o in r.options:
        new = spec.with_(**o.change)
        e = estimate(model, new)
        # a paged optimizer is judged at its floor, with the states evicted (estimate/host.py)
        want = e.paging["floor_device_total_bytes"] if o.key == "paged-optimizer" else e.device_total_bytes
        assert o.device_total_bytes == want
        host_ok = budget.host_ram_bytes is None or e.host["peak_bytes"] <= budget.host_ram_bytes
        assert o.fits == (o.device_total_bytes <= budget.usable_bytes and host_ok)
        assert o.cost and o.source
    mb = next(o for o in r.options if o.key == "micro-batch")
    if mb.fits:
        assert mb.extra["gradient_accumulation_steps"] * mb.change["batch_size"] == spec.batch_size
    ctx = next(o for o in r.options if o.key == "shorter-context")
    assert ctx.fits and ctx.change["seq_len"] == r.max_seq_len  # the same search, the same answer


def test_combination_when_no_single_change_fits():
    model = resolve_model("llama-2-13b")
    spec = TrainSpec(bits=16, batch_size=2, seq_len=4096, gradient_checkpointing=False)
    budget = make_budget(gpu="rtx-3060")
    r = fit(model, spec, budget)
    assert not any(o.fits for o in r.options)
    assert r.combination and r.combination_fits and r.combination[-1].fits
    cur = spec
    last = device(model, spec)
    for step in r.combination:
        cur = cur.with_(**step.change)
        assert step.device_total_bytes == device(model, cur) < last  # every step lowers the total
        last = step.device_total_bytes
    assert last <= budget.usable_bytes
    assert [st.key for st in r.combination] == sorted((st.key for st in r.combination), key=TIERS.index)


def test_budget_too_small_even_for_the_weights():
    # (16 GiB now fits: sharded over 8 GPUs; 2 GiB fits nothing, even with parameters offloaded)
    with pytest.raises(MemplanError, match="cannot fit.*weights alone"):
        fit(resolve_model("llama-2-70b"), TrainSpec(), make_budget(budget="2GiB"))


def test_fit_searches_many_configurations_with_few_estimates():
    """What makes fit fast (timed in scripts/bench_fit.py, not here): monotone bisection decides >= 10,000
    configurations with a few dozen estimates."""
    model = resolve_model("llama-3-8b")
    r = fit(model, TrainSpec(bits=16, batch_size=8, seq_len=8192, gradient_checkpointing=False),
            make_budget(gpu="rtx-4090"))
    assert r.configurations_searched >= 10_000
    assert r.estimates <= 200


# ------------------------------------------------------------------------------------------------- the CLI


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_fit_cli_json(capsys):
    rc, out, err = run_cli(capsys, "fit", "llama-3-8b", "--gpu", "rtx-4090", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["fits"] and d["max_seq_len"] % 64 == 0 and d["max_batch_size"] >= 1
    assert d["budget"]["usable_bytes"] == d["budget"]["total_bytes"] - d["budget"]["margin_bytes"]
    assert d["configurations_searched"] >= 10_000


def test_fit_cli_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")
    rc, out, _ = run_cli(capsys, "fit", "llama-3-8b", "--budget", "24GiB", "--bits", "16", "-b", "4", "-s", "4096",
                         "--ckpt", "off")
    assert rc == 0
    assert "does not fit" in out and "cheapest first" in out and "Chen et al. 2016" in out
    assert re.search(r"searched [\d,]+ configurations", out)


@pytest.mark.parametrize("argv,needle", [
    (["fit", "llama-3-8b", "--gpu", "rtx-9999"], "unknown GPU"),
    (["fit", "llama-3-8b", "--budget", "24"], "bad size"),
    (["fit", "llama-3-8b", "--budget", "lots"], "bad size"),
    (["fit", "llama-3-8b"], "exactly one of --gpu"),
    (["fit", "llama-2-70b", "--budget", "2GiB"], "weights alone"),
    (["fit", "llama-3-8b", "--gpu", "4090", "--seq-len", "1024,2048"], "one value per training flag"),
    (["fit", "llama-3-8b", "--gpu", "4090", "--margin", "120%"], "bad margin"),
    (["gpus", "no-such-model"], "unknown model"),
    (["sweep", "llama-3-8b", "--out", "/tmp/x.csv", "--plot-gpus", "rtx-9999"], "unknown GPU"),
])
def test_error_paths_exit_2_with_one_line(capsys, argv, needle):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert needle in err and err.count("\n") == 1 and err.startswith(f"memplan {argv[0]}: error: ")


def test_gpus_cli_json_sorted_and_complete(capsys):
    from memplan.catalog import gpu_list

    rc, out, _ = run_cli(capsys, "gpus", "llama-3-8b", "--seq-len", "4096", "--json")
    assert rc == 0
    d = json.loads(out)
    rows = d["gpus"]
    assert {r["gpu"] for r in rows} == {g.name for g in gpu_list()}
    assert [r["headroom_bytes"] for r in rows] == sorted(r["headroom_bytes"] for r in rows)
    for r in rows:
        assert r["headroom_bytes"] == r["memory_bytes"] - d["device_total_bytes"]
        assert r["verdict"] == ("fits" if r["headroom_bytes"] >= r["margin_bytes"] else
                                "tight" if r["headroom_bytes"] >= 0 else "short")
    rc, out, _ = run_cli(capsys, "gpus", "llama-3-8b")
    assert rc == 0 and "rtx-4090" in out and "smallest" in out


def test_fit_and_gpus_import_no_torch_and_start_fast():
    code = ("import sys, time; t=time.perf_counter(); from memplan.cli import main; "
            "main(['fit','llama-3-8b','--gpu','rtx-4090','--json']); main(['gpus','llama-3-8b','--json']); "
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules and 'pandas' not in sys.modules, "
            "[m for m in sys.modules if m.split('.')[0] in ('torch','matplotlib','pandas')]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)


# ----------------------------------------------------------------------------------------------- the sweep


def documented_columns() -> list[str]:
    text = (ROOT / "docs" / "csv.md").read_text()
    return re.findall(r"^\| `([^`]+)` \|", text, flags=re.M)


def test_docs_csv_lists_the_columns():
    from memplan.report.rows import columns_markdown

    assert documented_columns() == COLUMN_NAMES
    assert columns_markdown() in (ROOT / "docs" / "csv.md").read_text()


def test_sweep_csv_header_is_the_documented_schema(tmp_path, capsys):
    out = tmp_path / "s.csv"
    rc, _, err = run_cli(capsys, "sweep", "llama-3.2-1b", "qwen2.5-0.5b", "--seq-len", "512,1024", "--bits", "4,16",
                         "--out", str(out))
    assert rc == 0, err
    with open(out) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == documented_columns()
    assert len(rows) == 2 * 2 * 2
    assert {r["model"] for r in rows} == {"llama-3.2-1b", "qwen2.5-0.5b"}
    from memplan import __version__

    for r in rows:
        assert r["memplan_version"] == __version__ and r["calibration"]
        est = estimate(resolve_model(r["model"]), TrainSpec(bits=int(r["bits"]), seq_len=int(r["seq_len"])))
        assert int(r["device_total_bytes"]) == est.device_total_bytes
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary


@pytest.mark.parametrize("kind", ["lines", "bars"])
def test_sweep_plots(tmp_path, capsys, kind):
    pytest.importorskip("matplotlib")
    png = tmp_path / f"{kind}.png"
    rc, _, err = run_cli(capsys, "sweep", "llama-3.2-1b", "--seq-len", "512,1024,2048", "--bits", "4,8",
                         "--out", str(tmp_path / "s.csv"), "--plot", str(png), "--kind", kind)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_committed_example_reports_match_the_schema():
    for path in sorted((ROOT / "reports").glob("sweep_*.csv")):
        with open(path) as f:
            assert next(csv.reader(f)) == COLUMN_NAMES, path
