"""Robustness and safety of `memplan profile` (issue 6): interrupted and concurrent grids, defensive reading of
profile files, safetensors-only checkpoints, no remote code without --trust-remote-code.

The grid tests run the real command line on a tiny Llama (hidden 64, 2 layers, vocab 256, 1 step, no trace), one
child process per configuration (~5-8 s each on 2 cores, mostly imports). Everything is written under tmp_path.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memplan.profile import schema
from memplan.spec import TrainSpec

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
        "tie_word_embeddings": False}
FAST = ["--device", "cpu", "--steps", "1", "--no-trace", "--no-progress", "--threads", "1"]


def _needs_torch():
    for mod in ("torch", "transformers", "peft", "bitsandbytes"):
        pytest.importorskip(mod)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("random-weights")
    return dict(os.environ, PYTHONPATH=str(ROOT), MEMPLAN_WEIGHTS_CACHE=str(cache), PYTHONUNBUFFERED="1",
                COLUMNS="200")  # rich wraps tables to the terminal width


def _memplan(*args, env, cwd, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "memplan", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, **kw)


def _write_tiny(folder: Path, **extra) -> Path:
    path = folder / "tiny.json"
    path.write_text(json.dumps({**TINY, **extra}))
    return path


def _check_outputs(profiles: Path, csv_path: Path, n: int) -> list[dict]:
    """n configurations, each exactly once: n valid JSON files with distinct keys, nothing else left behind
    (no temporary or lock file); the CSV has one header and n complete rows with distinct keys."""
    files = sorted(profiles.glob("*.json"))
    docs = [json.loads(f.read_text()) for f in files]
    assert all(schema.validate(d) is None for d in docs)
    assert len(files) == n and len({d["key"] for d in docs}) == n, [f.name for f in files]
    assert all(d["status"] == "ok" for d in docs)
    assert [p.name for p in profiles.iterdir() if p.suffix != ".json"] == []  # no .tmp, no .lock
    text = csv_path.read_text()
    assert text.endswith("\n") and text.count("created,key,") == 1
    lines = text.splitlines()
    parsed = list(csv.reader(lines))
    assert all(len(r) == len(schema.CSV_COLUMNS) for r in parsed)  # no torn or interleaved line
    rows = list(csv.DictReader(lines))
    assert len(rows) == n and len({r["key"] for r in rows}) == n, [r["key"] for r in rows]
    assert {r["key"] for r in rows} == {d["key"][:12] for d in docs}
    assert all(r["status"] == "ok" and r["measured_peak_bytes"] for r in rows)
    return rows


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ------------------------------------------------------------------------------------- interrupted grids

@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_parent_sigkill_mid_grid_resumes_without_duplicates(tmp_path, env):
    """SIGKILL the grid's parent while a configuration runs (one already finished): its orphaned child dies too
    (PR_SET_PDEATHSIG) and writes nothing; the next call runs what is missing, and ends with exactly one profile
    and one CSV row per configuration."""
    _needs_torch()
    cfg = _write_tiny(tmp_path)
    profiles, csv_path = tmp_path / "p", tmp_path / "reports" / "profiles.csv"
    csv_path.parent.mkdir()  # an explicit --csv names an existing folder (memplan/outputs.py)
    args = [cfg, "--seq-len", "64,96", "--lora-r", "4,8", *FAST, "--profiles", profiles, "--csv", csv_path]
    proc = subprocess.Popen([sys.executable, "-m", "memplan", "profile", *map(str, args)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = list(profiles.glob("*.json"))
            if done and csv_path.is_file():
                kids = [k for k in _children(proc.pid) if _alive(k)]
                if kids:  # the second configuration's child is running
                    child = kids[0]
                    time.sleep(1.0)  # well inside its run (imports, load or steps)
                    break
            time.sleep(0.1)
        assert child is not None and proc.poll() is None, "the grid finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for _ in range(100):  # the orphan dies with its parent
            if not _alive(child):
                break
            time.sleep(0.05)
        assert not _alive(child), "the orphaned child outlived its parent"
    finally:
        if proc.poll() is None:
            proc.kill()
    first = {p.name for p in profiles.glob("*.json")}
    assert 1 <= len(first) < 4
    r = _memplan("profile", *args, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"skipped {len(first)} configuration(s)" in r.stderr
    _check_outputs(profiles, csv_path, 4)
    assert first <= {p.name for p in profiles.glob("*.json")}  # what was measured was kept, not rerun
    r = _memplan("profile", *args, env=env, cwd=tmp_path)  # a third call: nothing to do, nothing added
    assert r.returncode == 0 and "skipped 4 configuration(s)" in r.stderr
    _check_outputs(profiles, csv_path, 4)


def test_orphaned_child_exits_without_writing(tmp_path):
    """A child whose parent is not the grid named in its job (the grid died before the child started) runs
    nothing and writes nothing."""
    from memplan.profile import child

    out = tmp_path / "p" / "x.json"
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"parent_pid": 1 if os.getppid() != 1 else 2, "output": str(out)}))
    assert child.main([str(job)]) == 4
    assert not out.exists()
    assert child.orphaned({"parent_pid": os.getppid()}) is False and child.orphaned({}) is False


def test_profile_written_but_not_logged_is_logged_once(tmp_path):
    """The grid killed between its child writing a profile and its logging the CSV row: the next call skips the
    configuration and logs the missing row, once (deduplicated by run under the CSV lock)."""
    from memplan.profile.grid import Config, run_grid

    cfgs = [Config("tiny", dict(TINY), "test", TrainSpec(seq_len=s).to_dict(), "cpu", {"steps": 1}, label=str(s))
            for s in (64, 96)]
    profiles, csv_path = tmp_path / "p", tmp_path / "r.csv"
    for c in cfgs:
        prof = _valid_profile(key=c.key, model={"name": "tiny", "hf_config": dict(TINY)}, train=c.train,
                              run=c.run, created=f"2026-01-01T00:00:{c.train['seq_len'] % 60:02d}Z")
        schema.write_json_atomic(profiles / schema.profile_filename("tiny", "cpu", c.key, prof["created"]), prof)
    # one of the two rows was logged before the "kill"
    first = schema.read_profiles(profiles)[0]
    assert schema.append_csv(csv_path, schema.csv_row(first, first["_path"]))
    for _ in range(2):
        outs = run_grid(cfgs, profiles, csv_path, progress=False)
        assert [o.status for o in outs] == ["skipped", "skipped"]
        rows = list(csv.DictReader(csv_path.open()))
        assert sorted(r["key"] for r in rows) == sorted(c.key[:12] for c in cfgs)


def test_torn_csv_tail_is_cut_and_rows_are_not_duplicated(tmp_path):
    path = tmp_path / "r.csv"
    row = {k: "" for k in schema.CSV_COLUMNS}
    row.update(key="aaaaaaaaaaaa", created="2026-01-01T00:00:00Z", status="ok", model="m")
    assert schema.append_csv(path, row)
    with path.open("a") as f:
        f.write("2026-01-01T00:00:01Z,bbbbbbbbbbbb,ok,m,cp")  # a writer killed mid-row
    assert not schema.append_csv(path, row)  # the same run again: not written twice
    row2 = dict(row, key="cccccccccccc")
    assert schema.append_csv(path, row2)
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(len(r) == len(schema.CSV_COLUMNS) for r in csv.reader(lines))
    assert [r["key"] for r in csv.DictReader(lines)] == ["aaaaaaaaaaaa", "cccccccccccc"]
    torn_header = tmp_path / "h.csv"
    torn_header.write_text("created,key,sta")  # killed while writing the header
    assert schema.append_csv(torn_header, row)
    assert torn_header.read_text().splitlines()[0] == ",".join(schema.CSV_COLUMNS)


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".x_cpu_abc.json.{dead}.k2j3.tmp"
    live = tmp_path / f".y_cpu_abc.json.{os.getpid()}.k2j3.tmp"
    stale.write_text("{")
    live.write_text("{")
    assert schema.clean_stale_tmp(tmp_path) == []  # too young: maybe a writer on another host
    assert schema.clean_stale_tmp(tmp_path, min_age_s=0) == [stale.name]
    assert live.exists() and not stale.exists()


def test_key_lock_is_exclusive_and_leaves_no_file(tmp_path):
    code = ("import sys, time; from memplan.profile.schema import key_lock\n"
            "with key_lock(sys.argv[1], 'k' * 64) as held:\n"
            "    print(held, flush=True); time.sleep(1.5)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "True"
        with schema.key_lock(tmp_path, "k" * 64, blocking=False) as held:
            assert held is False
        with schema.key_lock(tmp_path, "j" * 64, blocking=False) as held:  # another key: free
            assert held is True
        t0 = time.monotonic()
        with schema.key_lock(tmp_path, "k" * 64) as held:  # blocks until the holder is done
            assert held is True and time.monotonic() - t0 > 0.3
    finally:
        holder.wait(10)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ concurrency

def test_two_grids_at_once_share_profiles_and_csv(tmp_path, env):
    """Two `memplan profile` processes started together over the same profiles folder and CSV, with one
    configuration in common: every configuration is run once, every file is valid, one header, no torn or
    duplicate row."""
    _needs_torch()
    cfg = _write_tiny(tmp_path)
    profiles, csv_path = tmp_path / "p", tmp_path / "reports" / "profiles.csv"
    csv_path.parent.mkdir()  # an explicit --csv names an existing folder (memplan/outputs.py)
    common = [cfg, "--lora-r", "4", *FAST, "--profiles", profiles, "--csv", csv_path]
    procs = [subprocess.Popen([sys.executable, "-m", "memplan", "profile", *map(str, common), "--seq-len", s],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in ("64,96", "96,128")]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in results]
    _check_outputs(profiles, csv_path, 3)
    assert sum("skipped 1 configuration(s)" in e or "skipped (ok)" in o for o, e in results) >= 1


# ------------------------------------------------------------------------------- reading profile files

def _valid_profile(**over):
    p = {"schema": schema.SCHEMA, "key": "k" * 64, "created": "2026-01-01T00:00:00Z", "status": "ok",
         "model": {"name": "m", "hf_config": {}}, "train": TrainSpec().to_dict(), "run": {"device": "cpu"},
         "measurements": {"phases": {"forward": {"tracker_peak_bytes": 1000, "seconds": 0.5}},
                          "peak": {"phase": "forward", "bytes": 1000, "tracker_bytes": 1000}},
         "environment": {}}
    p.update(over)
    return p


def _deep(**path_values):
    p = _valid_profile()
    for dotted, value in path_values.items():
        obj = p
        *parents, last = dotted.split("__")
        for k in parents:
            obj = obj[k]
        obj[last] = value
    return p


BAD = {
    "truncated.json": '{"schema": "memplan.profile/1", "key": "abc", "crea',
    "empty.json": "",
    "binary.json": b"\x80\x81\xfe\xff",
    "list.json": "[1, 2, 3]",
    "foreign.json": {"schema": "someone.else/3", "data": 1},
    "future.json": _valid_profile(schema="memplan.profile/2"),
    "nan.json": json.dumps(_valid_profile()).replace('"bytes": 1000', '"bytes": NaN'),
    "missing.json": {k: v for k, v in _valid_profile().items() if k != "measurements"},
    "key_type.json": _valid_profile(key=12345),
    "status.json": _valid_profile(status="great"),
    "device.json": _deep(run__device="tpu"),
    "phase_type.json": _deep(measurements__phases__forward__tracker_peak_bytes="a lot"),
    "phase_list.json": _deep(measurements__phases__forward=[1, 2]),
    "peak_bool.json": _deep(measurements__peak__bytes=True),
    "peak_type.json": _deep(measurements__peak=7),
    "steps_type.json": _deep(run__steps="three"),
    "gpus_type.json": _valid_profile(environment={"gpus": ["H100"]}),
    "error_type.json": _valid_profile(status="error", error={"type": 3}),
    "cmp_type.json": _valid_profile(comparison={"estimate": {"peak_bytes": "x"}}),
    "train_field.json": _deep(train__flux_capacitor=1),
    "train_value.json": _deep(train__seq_len=-5),
}


def _write_bad(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in BAD.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))


def test_every_bad_file_is_skipped_with_one_line_naming_it(tmp_path, capsys):
    _write_bad(tmp_path)
    schema.write_json_atomic(tmp_path / "good.json", _valid_profile())
    got = schema.read_profiles(tmp_path)
    assert [Path(p["_path"]).name for p in got] == ["good.json"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(BAD), err
    for name in BAD:
        (line,) = [e for e in err if f"/{name}: " in e]
        assert line.startswith("memplan: skipping ")
    assert schema.done_keys(tmp_path).keys() == {"k" * 64}


def test_validate_names_the_bad_field():
    assert "measurements.phases.forward.tracker_peak_bytes" in schema.validate(BAD["phase_type.json"])
    assert "run.steps" in schema.validate(BAD["steps_type.json"])
    assert "flux_capacitor" in schema.validate(BAD["train_field.json"])
    assert schema.validate(_valid_profile(oom=None, error=None, comparison={}, finished="x")) is None


def test_show_prints_the_good_profiles_of_a_mixed_folder(tmp_path, env):
    folder = tmp_path / "profiles"
    _write_bad(folder)
    for name in ("alpha", "beta"):
        schema.write_json_atomic(folder / f"{name}.json",
                                 _valid_profile(key=name * 8, model={"name": f"model-{name}", "hf_config": {}}))
    r = _memplan("profile", "--show", folder, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "model-alpha" in r.stdout and "model-beta" in r.stdout
    err = r.stderr.strip().splitlines()
    assert len(err) == len(BAD) and all(e.startswith("memplan: skipping ") for e in err), err
    # files named one by one: the same; --json too
    r = _memplan("profile", "--show", folder / "truncated.json", folder / "alpha.json", "--json", env=env,
                 cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1
    assert "truncated.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # --recompare that cannot rebuild a profile's model: one line, the report still printed
    r = _memplan("profile", "--show", folder / "alpha.json", "--recompare", "--no-trace", env=env, cwd=tmp_path,
                 timeout=120)
    assert r.returncode == 0 and "model-alpha" in r.stdout
    assert "not recomparing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # nothing valid: a one-line error
    r = _memplan("profile", "--show", folder / "empty.json", env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("memplan profile: error: no valid")


# ----------------------------------------------------------------------------- checkpoints and remote code

def test_pickle_only_checkpoints_are_refused(tmp_path, env):
    for name in ("pytorch_model.bin", "model.pt", "model.ckpt"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(TINY))
        (folder / name).write_bytes(pickle.dumps({"w": [1.0]}))
        r = _memplan("profile", "--weights", folder, "--device", "cpu", env=env, cwd=tmp_path, timeout=120)
        assert r.returncode == 2, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert "no .safetensors" in line and "pickle" in line and name in line


def test_malformed_safetensors_sets_are_refused(tmp_path):
    from memplan.errors import MemplanError
    from memplan.profile.loading import check_weights_dir

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps({"w": 1}))  # a pickle renamed
    with pytest.raises(MemplanError, match="model.safetensors is not a valid safetensors file"):
        check_weights_dir(tmp_path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    assert check_weights_dir(tmp_path) == tmp_path
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model.safetensors", "b": "pytorch_model-2.bin"}}))
    with pytest.raises(MemplanError, match="not a .safetensors file"):
        check_weights_dir(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-2.safetensors"}}))
    with pytest.raises(MemplanError, match="missing shard"):
        check_weights_dir(tmp_path)


class _Trap:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_next_to_safetensors_is_never_loaded(tmp_path, capsys):
    """Decision (docs/profile.md): a folder with complete safetensors weights is accepted even with pickle files
    next to them (a trainer's training_args.bin, an old pytorch_model.bin); they are named in a one-line note
    and never read: from_pretrained runs with use_safetensors=True."""
    _needs_torch()
    import shutil

    from memplan.profile.loading import check_weights_dir, load_pretrained, pickle_files
    from memplan.profile.weights import write_random_checkpoint

    folder = tmp_path / "ckpt"
    shutil.copytree(write_random_checkpoint(TINY, "bf16", tmp_path / "cache"), folder)
    marker = tmp_path / "UNPICKLED"
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (folder / name).write_bytes(pickle.dumps(_Trap(str(marker))))
    assert check_weights_dir(folder) == folder
    assert pickle_files(folder) == ["optimizer.pt", "pytorch_model.bin", "training_args.bin"]
    model = load_pretrained(folder, TrainSpec(seq_len=64, lora_r=4), "cpu")
    assert model is not None and not marker.exists()
    # the command says so, in one line, then goes on (here: to a usage error after the check)
    from memplan.cli import main

    capsys.readouterr()
    assert main(["profile", "--weights", str(folder), "--device", "cpu", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "pickle files never read: optimizer.pt, pytorch_model.bin" in err[0]
    assert "--steps must be at least 1" in err[1]
    assert not marker.exists()


def test_remote_code_configs_need_trust_remote_code(tmp_path, env):
    """A model_type only remote code provides is refused without the flag; a native model_type is read natively
    whatever its auto_map says (transformers' AutoConfig does the same) and run with trust_remote_code=False."""
    cfg = _write_tiny(tmp_path, model_type="evil_lm", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    r = _memplan("profile", cfg, *FAST, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "remote code" in line and "--trust-remote-code" in line
    assert not (tmp_path / "profiles").exists()
    # the same config in a --weights folder
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "config.json").write_text(cfg.read_text())
    header = b'{"__metadata__": {"format": "pt"}}'
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    r = _memplan("profile", "--weights", folder, *FAST, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "remote code" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a native model_type with an auto_map: accepted without the flag, auto_map dropped, the output says why
    from memplan.cli import build_parser
    from memplan.commands.profile import build_configs

    native = _write_tiny(tmp_path, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    args = build_parser().parse_args(["profile", str(native), "--device", "cpu"])
    (c,) = build_configs(args)
    assert "auto_map" not in c.hf_config


def test_the_child_refuses_a_remote_code_job_without_the_flag(tmp_path):
    _needs_torch()
    from memplan.profile.runner import run_job

    job = {"key": "k" * 64, "device": "cpu", "output": None, "compare": False,
           "model": {"name": "evil", "hf_config": {**TINY, "auto_map": {"AutoConfig": "x.Y"}}},
           "train": TrainSpec(seq_len=64).to_dict(), "run": {"device": "cpu", "steps": 1}}
    prof = run_job(job)
    assert prof["status"] == "error" and "remote code" in prof["error"]["message"]
    assert prof["measurements"]["phases"] == {}
