"""`memplan report --html`: one self-contained file whose figures are the CLI's result objects (estimate --json,
trace --json, validate's profile rows), for a configuration, a grid and a sweep; bad output paths are one line.
(tests/test_web_browser.py opens the file in Chromium.)"""
from __future__ import annotations

import html
import json
import re
import subprocess
import sys

import pytest

from memplan.cli import main

GIB = 2**30
TINY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024,
        "tie_word_embeddings": False}


pytestmark = pytest.mark.usefixtures("no_calibration")  # tests/conftest.py


def results(path) -> dict:
    text = path.read_text()
    m = re.search(r'<script type="application/json" id="memplan-results">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def page_text(path) -> str:
    """The HTML without its inlined scripts (plotly.min.js holds link strings it never loads)."""
    return re.sub(r"<script\b.*?</script>", "", path.read_text(), flags=re.S)


def cli_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_one_configuration(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "llama-3.1-8b", "--seq-len", "8192", "--gpu", "rtx-4090", "--html", str(out)]) == 0
    capsys.readouterr()
    want = cli_json(capsys, "estimate", "llama-3.1-8b", "--seq-len", "8192", "--gpu", "rtx-4090", "--json")
    fit = cli_json(capsys, "fit", "llama-3.1-8b", "--seq-len", "8192", "--gpu", "rtx-4090", "--json")
    doc = results(out)
    assert doc["estimates"] == [want]
    doc["fit"].pop("seconds"), fit.pop("seconds")
    assert doc["fit"] == fit
    text = page_text(out)
    assert f'data-bytes="{want["peak_bytes"]}">{want["peak_bytes"] / GIB:,.2f} GiB' in text
    for name, b in want["components"].items():  # the component table: every non-zero component with its GiB
        if b:
            assert re.search(rf"<td[^>]*>{name}</td><td[^>]*>{b / GIB:,.2f}</td>", text), name
    assert "memplan report llama-3.1-8b --seq-len 8192 --gpu rtx-4090 --html" in text  # how to write it again
    for line in ("memplan 0.1.0", "device overheads: ", "transformers 5.24", "architecture from https://",
                 "figures: plotly.js"):
        assert line in html.unescape(text)
    # self-contained: no src/href outside the document, plotly inlined once
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)
    raw = out.read_text()
    assert raw.count("plotly.js v") == 1 and "<script src" not in raw
    assert raw.count('Plotly.newPlot("fig') == 1


def test_grid_and_sweep(tmp_path, capsys):
    out = tmp_path / "grid.html"
    assert main(["report", "qwen2.5-0.5b", "gemma-2-2b", "--seq-len", "512,4096", "--bits", "4,16",
                 "--html", str(out)]) == 0
    capsys.readouterr()
    want = (cli_json(capsys, "estimate", "qwen2.5-0.5b", "--seq-len", "512,4096", "--bits", "4,16", "--json") +
            cli_json(capsys, "estimate", "gemma-2-2b", "--seq-len", "512,4096", "--bits", "4,16", "--json"))
    doc = results(out)
    assert doc["estimates"] == want and len(doc["gpus"]) == 8
    text = page_text(out)
    assert "qwen2.5-0.5b bits=4 seq_len=512" in text and "gemma-2-2b bits=16 seq_len=4096" in text
    cells = re.findall(r'<td class="num" data-bytes="(\d+)">([0-9.,]+)</td>', text)
    assert [(int(b), t) for b, t in cells] == [(w["peak_bytes"], f"{w['peak_bytes'] / GIB:,.2f}") for w in want]


def test_without_plotly_the_tables_remain(tmp_path, capsys, monkeypatch):
    import memplan.report.figures as figures

    monkeypatch.setattr(figures, "plotly_js", lambda: None)
    out = tmp_path / "r.html"
    assert main(["report", "llama-2-7b", "--html", str(out)]) == 0
    assert "plotly is not installed" in capsys.readouterr().err
    text = out.read_text()
    assert "Plotly.newPlot" not in text and "tables but no figures" in text and 'id="peak"' in text


@pytest.mark.parametrize("where, message", [
    ("{tmp}", "is a directory; give a file path"),
    ("{tmp}/missing/r.html", "does not exist"),
    ("/proc/r.html", "not writable"),
])
def test_bad_output_path_is_one_line(tmp_path, where, message):
    r = subprocess.run([sys.executable, "-m", "memplan", "report", "llama-2-7b", "--html",
                        where.format(tmp=tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memplan report: error: --html") and message in lines[0]


def test_trace_timeline_and_provenance(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    cfg = tmp_path / "tiny" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "trace.html"
    assert main(["report", str(cfg), "--seq-len", "128", "--trace", "--html", str(out)]) == 0
    capsys.readouterr()
    doc = results(out)
    tr = doc["traces"][0]  # TraceResult.to_dict() (what `memplan trace --json` prints) + the downsampled timeline
    assert tr["device"] == "meta" and tr["config"]["seq_len"] == 128
    assert sum(tr["components"].values()) == tr["peak_bytes"] == max(tr["phases"].values())
    assert tr["timeline"] and max(row[1] for row in tr["timeline"]) == tr["peak_bytes"]
    traced = tr
    est = doc["estimates"][0]
    assert tr["estimate_error_pct"] == round((est["peak_bytes"] - tr["peak_bytes"]) / tr["peak_bytes"] * 100, 3)
    text = html.unescape(page_text(out))
    assert f'data-bytes="{traced["peak_bytes"]}"' in text
    import torch

    assert f"torch {torch.__version__}" in text and "on meta tensors" in text
    assert out.read_text().count('Plotly.newPlot("fig') == 2  # components and the timeline


def test_profiles_are_validates_rows(tmp_path, capsys, monkeypatch):
    """Against SYNTHETIC TEST FIXTURES (tests/test_calibrate.py builds them; not measurements): the report's rows
    are what `memplan validate --against profiles` writes."""
    pytest.importorskip("torch")
    from test_calibrate import synthetic_gpu_profile, write_fixtures

    monkeypatch.chdir(tmp_path)  # validate's trace cache (reports/.trace_cache) goes here
    folder = write_fixtures(tmp_path / "fixtures", [synthetic_gpu_profile(i, a) for i, a in enumerate([2 * GIB,
                                                                                                        5 * GIB])])
    out = tmp_path / "p.html"
    assert main(["report", "llama-2-7b", "--profiles", str(folder), "--html", str(out)]) == 0
    capsys.readouterr()
    assert main(["validate", "--against", "profiles", str(folder), "--csv", str(tmp_path / "v.csv"),
                 "--figure", "none"]) == 0
    import csv

    rows = list(csv.DictReader((tmp_path / "v.csv").open()))
    got = results(out)["profiles"]["rows"]
    assert len(got) == len(rows) == 2
    for g, r in zip(got, rows):
        for key in ("estimate_tensor_peak_bytes", "trace_peak_bytes", "measured_tensor_peak_bytes"):
            assert str(g[key]) == r[key]
    assert 'id="profiles"' in out.read_text()


def figures_of(path) -> dict:
    """Each figure's JSON, by its div id, from the report's Plotly.newPlot calls."""
    out = {}
    for m in re.finditer(r'^\(f=>Plotly\.newPlot\("(fig\d+)".*?\)\)\((\{.*\})\);$', path.read_text(), re.M):
        out[m.group(1)] = json.loads(m.group(2).replace("<\\/", "</"))
    return out


def test_sequence_sweep_draws_device_total_lines(tmp_path, capsys):
    out = tmp_path / "sweep.html"
    assert main(["report", "llama-3.2-1b", "--seq-len", "1024,4096,16384", "--bits", "4,16", "--gpu", "rtx-4090",
                 "--html", str(out)]) == 0
    capsys.readouterr()
    want = cli_json(capsys, "estimate", "llama-3.2-1b", "--seq-len", "1024,4096,16384", "--bits", "4,16",
                    "--gpu", "rtx-4090", "--json")
    figs = figures_of(out)
    assert set(figs) == {"fig1", "fig2"}
    lines = {t["name"]: t for t in figs["fig2"]["data"]}
    assert set(lines) == {"bits=4", "bits=16"}
    for bits in (4, 16):
        rows = sorted((w["config"]["seq_len"], w["device_total_bytes"]) for w in want if w["config"]["bits"] == bits)
        assert lines[f"bits={bits}"]["x"] == [s for s, _ in rows]
        assert lines[f"bits={bits}"]["y"] == [round(b / GIB, 4) for _, b in rows]
    assert [a["text"] for a in figs["fig2"]["layout"]["annotations"]] == ["rtx-4090 24 GiB"]
    stacked = {t["name"]: t["y"] for t in figs["fig1"]["data"]}  # components at each configuration's peak
    assert stacked["activations"] == [round(w["components"]["activations"] / GIB, 4) for w in want]
