"""memplan profile on the CPU: real QLoRA steps of a tiny Llama written from a config by the test.

Each profile runs in a child process (the real isolation path); a child takes ~5-10 s on 2 cores, most of it
importing torch/transformers/PEFT. Everything is written under tmp_path; random-weight checkpoints go to a
per-session cache.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.profile import schema  # noqa: E402
from memplan.profile.grid import Config, run_grid, run_one  # noqa: E402
from memplan.profile.measure import parse_oom_bytes  # noqa: E402
from memplan.spec import TrainSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024,
        "tie_word_embeddings": False}


@pytest.fixture(scope="session")
def weights_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("random-weights")
    os.environ["MEMPLAN_WEIGHTS_CACHE"] = str(path)
    return path


def _config(weights_cache, steps=2, kernels="gpu", cpu_budget=None, **train) -> Config:
    spec = TrainSpec(**{"seq_len": 128, "lora_r": 8, **train})
    run = {"steps": steps, "load_path": "pretrained", "seed": 0, "weights_dir": None,
           "weights_cache": str(weights_cache), "cpu_budget_bytes": cpu_budget, "memory_fraction": None,
           "kernels": kernels}
    return Config("tiny-llama", dict(TINY), "test", spec.to_dict(), "cpu", run, label="tiny")


def _no_partial_files(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"] if folder.is_dir() else []


# ------------------------------------------------------------------------------------- the real CPU profile

def test_profile_writes_valid_json_and_equals_the_trace(tmp_path, weights_cache):
    """The CPU tracker's peak on real tensors equals the meta trace of the same configuration, byte for byte,
    when the CPU step runs the trace's kernel models (--kernels gpu); per phase too."""
    profiles, csv_path = tmp_path / "profiles", tmp_path / "reports" / "profiles.csv"
    cfg = _config(weights_cache)
    (out,) = run_grid([cfg], profiles, csv_path, progress=False, threads=2)
    assert out.status == "ok", out.log_tail
    data = json.loads(Path(out.path).read_text())
    assert schema.validate(data) is None
    assert data["schema"] == "memplan.profile/1"
    assert data["train"] == cfg.train and data["model"]["hf_config"] == TINY
    assert data["environment"]["versions"]["torch"] and "gpus" in data["environment"]
    assert not any(k in json.dumps(data["environment"]).lower() for k in ("hostname", "nodename"))
    meas = data["measurements"]
    for phase in ("load", "forward", "backward", "optimizer", "steady"):
        assert meas["phases"][phase]["tracker_peak_bytes"] > 0
        assert meas["phases"][phase]["rss_peak_bytes"] > meas["phases"][phase]["tracker_peak_bytes"]
    assert meas["tokens_per_s"] > 0 and len(meas["step_times_s"]) == 2
    cmp_ = data["comparison"]
    assert cmp_["trace"]["peak_bytes"] == meas["peak"]["bytes"]  # byte-equal
    assert cmp_["trace"]["error_pct"] == 0.0
    for phase, value in cmp_["trace"]["phases"].items():
        assert cmp_["measured"]["phases"][phase] == value, phase
    assert "estimate" in cmp_
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    assert int(rows[0]["measured_peak_bytes"]) == meas["peak"]["bytes"]
    assert _no_partial_files(profiles) == []

    # resumable: the same configuration is skipped (no child runs), unless forced
    (again,) = run_grid([_config(weights_cache)], profiles, csv_path, progress=False)
    assert again.status == "skipped" and again.path == out.path
    assert len(list(csv.DictReader(csv_path.open()))) == 1


def test_native_cpu_kernels_equal_the_trace_without_dropout(tmp_path, weights_cache):
    """With the CPU's own kernels (SDPA takes PyTorch's CPU flash kernel, O(s) like the GPU's) and no LoRA dropout,
    the real CPU step and the meta trace hold the same bytes. (With dropout, the CPU's dropout keeps its mask in
    the input's dtype where the fused CUDA kernel keeps 1 byte per element: docs/profile.md.)"""
    cfg = _config(weights_cache, kernels="native", lora_dropout=0.0, gradient_checkpointing=False)
    out = run_one(cfg, tmp_path / "profiles", threads=2)
    assert out.status == "ok", out.log_tail
    cmp_ = out.profile["comparison"]
    assert cmp_["trace"]["peak_bytes"] == out.profile["measurements"]["peak"]["bytes"]


def test_oom_is_a_result(tmp_path, weights_cache):
    """--cpu-budget: the tracker raises a simulated out-of-memory error; recorded with phase and bytes."""
    csv_path = tmp_path / "profiles.csv"
    cfg = _config(weights_cache, cpu_budget=2 * 2**20, steps=1)
    out = run_one(cfg, tmp_path / "profiles", trace=False, threads=2)
    assert out.status == "oom", out.log_tail
    assert out.returncode == 0
    oom = out.profile["oom"]
    assert oom["phase"] in ("forward", "backward", "optimizer")
    assert oom["requested_bytes"] > 0 and oom["live_bytes"] + oom["requested_bytes"] > 2 * 2**20
    assert oom["budget_bytes"] == 2 * 2**20
    assert out.profile["measurements"]["phases"]["load"]["tracker_peak_bytes"] <= 2 * 2**20
    schema.append_csv(csv_path, schema.csv_row(out.profile, out.path))
    row = next(csv.DictReader(csv_path.open()))
    assert row["status"] == "oom" and row["oom_phase"] == oom["phase"]
    # an OOM is a final result: a resumed grid does not run it again
    assert cfg.key in schema.done_keys(tmp_path / "profiles")


def test_killed_child_leaves_no_partial_profile(tmp_path, weights_cache):
    profiles = tmp_path / "profiles"
    pid = {}

    def on_event(ev):
        if ev["event"] == "started":
            pid["child"] = ev["pid"]
        elif ev["event"] == "phase" and ev["phase"] == "forward":
            os.kill(pid["child"], signal.SIGKILL)

    out = run_one(_config(weights_cache), profiles, on_event=on_event, trace=False, threads=2)
    assert out.status == "crashed" and out.returncode == -signal.SIGKILL
    assert list(profiles.glob("*.json")) == [] and _no_partial_files(profiles) == []
    assert schema.done_keys(profiles) == {}


def test_ctrl_c_keeps_what_was_measured(tmp_path, weights_cache):
    """SIGINT (what the parent forwards on Ctrl-C) ends the child cleanly: an "interrupted" profile with the
    phases measured so far; a resumed grid runs it again."""
    profiles = tmp_path / "profiles"
    pid = {}

    def on_event(ev):
        if ev["event"] == "started":
            pid["child"] = ev["pid"]
        elif ev["event"] == "phase" and ev["phase"] == "backward":
            os.kill(pid["child"], signal.SIGINT)

    out = run_one(_config(weights_cache), profiles, on_event=on_event, trace=False, threads=2)
    assert out.status == "interrupted", out.log_tail
    phases = out.profile["measurements"]["phases"]
    assert phases["load"]["tracker_peak_bytes"] > 0 and phases["forward"]["tracker_peak_bytes"] > 0
    assert schema.validate(json.loads(Path(out.path).read_text())) is None
    assert schema.done_keys(profiles) == {}


def test_cli_profile_and_env(tmp_path, weights_cache):
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(TINY))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "memplan", "profile", str(cfg_path), "--device", "cpu", "-s", "64",
                        "--steps", "1", "--no-trace", "--no-progress", "--threads", "2", "--cpu-budget", "1MiB"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "out of memory" in r.stdout
    (path,) = list((tmp_path / "profiles").glob("*.json"))
    assert json.loads(path.read_text())["status"] == "oom"
    assert (tmp_path / "reports" / "profiles.csv").is_file()
    r = subprocess.run([sys.executable, "-m", "memplan", "env"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    if "No GPU detected" not in r.stdout:
        assert "GPU 0:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "memplan", "profile", "--weights", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "config.json" in r.stderr


# -------------------------------------------------------------------------------------------- the loaders

def test_direct_load_builds_the_same_tensors_as_from_pretrained(tmp_path):
    from memplan.profile.loading import load_direct, load_pretrained
    from memplan.profile.weights import write_random_checkpoint

    train = TrainSpec()
    folder = write_random_checkpoint(TINY, "bf16", tmp_path, layers_per_shard=1)
    assert len(list(folder.glob("*.safetensors"))) == 3  # 2 layers, one shard each, + the rest
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.1.mlp.down_proj.weight"] == "model-00003-of-00003.safetensors"
    mtime = (folder / "model-00001-of-00003.safetensors").stat().st_mtime
    assert write_random_checkpoint(TINY, "bf16", tmp_path, layers_per_shard=1) == folder  # cached, not rewritten
    assert (folder / "model-00001-of-00003.safetensors").stat().st_mtime == mtime

    def summary(model):
        out = {}
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            out[name] = (tuple(t.shape), t.dtype, type(t).__name__, t.untyped_storage().nbytes())
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                out[name + ".absmax"] = (tuple(qs.absmax.shape), qs.absmax.dtype, qs.dtype, qs.quant_type)
        return out

    a = load_pretrained(folder, train, "cpu")
    b = load_direct(TINY, train, "cpu")
    assert summary(a) == summary(b)
    assert getattr(b, "is_loaded_in_4bit", False)
    assert torch.equal(a.model.rotary_emb.inv_freq, b.model.rotary_emb.inv_freq)


def test_weights_dir_must_be_safetensors(tmp_path):
    from memplan.errors import MemplanError
    from memplan.profile.loading import check_weights_dir

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MemplanError, match="pickle"):
        check_weights_dir(tmp_path)


def test_cache_clean(tmp_path):
    from memplan.profile import weights as rw

    (tmp_path / "llama-bf16-abc").mkdir()
    (tmp_path / "llama-bf16-abc" / rw.COMPLETE).write_text("{}")
    (tmp_path / ".llama-bf16-def.tmp-1").mkdir()
    assert [e["complete"] for e in rw.list_cache(tmp_path)] == [False, True]
    assert len(rw.clean_cache(tmp_path, partial_only=True)) == 1
    assert len(rw.clean_cache(tmp_path, older_than_days=1)) == 0
    assert len(rw.clean_cache(tmp_path)) == 1 and rw.list_cache(tmp_path) == []


# ----------------------------------------------------------------------------------------- schema and CSV

def _valid_profile(**over):
    p = {"schema": schema.SCHEMA, "key": "k" * 64, "created": "2026-01-01T00:00:00Z", "status": "ok",
         "model": {"name": "m", "hf_config": {}}, "train": TrainSpec().to_dict(), "run": {"device": "cpu"},
         "measurements": {"phases": {}}, "environment": {}}
    p.update(over)
    return p


def test_read_profiles_skips_corrupted_and_foreign(tmp_path, capsys):
    schema.write_json_atomic(tmp_path / "good.json", _valid_profile())
    (tmp_path / "truncated.json").write_text('{"schema": "memplan.profile/1", "key"')
    schema.write_json_atomic(tmp_path / "foreign.json", {"schema": "other/2"})
    schema.write_json_atomic(tmp_path / "future.json", _valid_profile(schema="memplan.profile/2"))
    (tmp_path / "list.json").write_text("[1, 2]")
    got = schema.read_profiles(tmp_path)
    assert [Path(p["_path"]).name for p in got] == ["good.json"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("memplan: skipping ") for line in err)
    assert any("truncated.json" in line and "corrupted" in line for line in err)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "p.json"
    schema.write_json_atomic(target, _valid_profile())
    before = target.read_text()
    with pytest.raises(ValueError):
        schema.write_json_atomic(target, _valid_profile(bad=float("nan")))  # allow_nan=False fails mid-write
    assert target.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def _append_many(path, n, tag):
    for i in range(n):
        row = {k: "" for k in schema.CSV_COLUMNS}
        row.update(key=f"{tag}-{i}", status="ok", model="x" * 200)
        schema.append_csv(path, row)


def test_csv_append_is_safe_across_processes(tmp_path):
    path = tmp_path / "r.csv"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, 100, t)) for t in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 200 and {r["key"] for r in rows} == {f"{t}-{i}" for t in "ab" for i in range(100)}
    assert path.read_text().count("created,key,") == 1


def test_parse_oom_message():
    msg = ("CUDA out of memory. Tried to allocate 1.95 GiB. GPU 0 has a total capacity of 79.15 GiB of which "
           "1.20 GiB is free. Including non-PyTorch memory, this process has 77.94 GiB memory in use.")
    assert parse_oom_bytes(msg) == round(1.95 * 2**30)
    assert parse_oom_bytes("Tried to allocate 20.00 MiB") == 20 * 2**20
    assert parse_oom_bytes("Tried to allocate 512 bytes") == 512
    assert parse_oom_bytes("something else") is None


def test_parse_bytes_and_catalog_match():
    from memplan.commands.profile import parse_bytes
    from memplan.profile.env import match_catalog

    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("100") == 100
    gpu, how = match_catalog("NVIDIA H200", 143771 * 2**20)
    assert gpu is not None and gpu.name == "h200" and how == "name and memory"
    assert match_catalog("Some Unknown Accelerator", 10**9)[0] is None


# ------------------------------------------------------------------ the CUDA bookkeeping, with a fake device

def test_cuda_phase_bookkeeping_with_a_fake_device(monkeypatch):
    """The CUDA meter and summary, driven by fake allocator/NVML readings (no GPU in CI)."""
    from memplan.profile import runner
    from memplan.profile.measure import Sampler

    state = {"alloc": 0, "peak": 0, "reserved": 0, "nvml": 1000}
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=state["alloc"]))
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a: state["peak"])
    monkeypatch.setattr(cuda, "max_memory_reserved", lambda *a: state["reserved"])
    monkeypatch.setattr(cuda, "memory_allocated", lambda *a: state["alloc"])
    monkeypatch.setattr(cuda, "memory_reserved", lambda *a: state["reserved"])
    monkeypatch.setattr(runner, "emit", lambda *a, **k: None)

    def alloc(n):
        state["alloc"] += n
        state["peak"] = max(state["peak"], state["alloc"])
        state["reserved"] = max(state["reserved"], state["alloc"] + 100)
        state["nvml"] = 1000 + 500 + state["reserved"]

    sampler = Sampler(lambda: state["nvml"], interval=10)  # not started: samples at phase boundaries only
    phases = {}
    meter = runner._Meter("cuda", phases, sampler=sampler, nvml_baseline=1000)
    meter.enter("load"); alloc(4000); meter.enter(None)
    meter.enter("forward"); alloc(3000); alloc(-2000); meter.enter("backward"); alloc(5000); alloc(-6000)
    meter.enter("optimizer"); alloc(800); meter.enter(None)
    meter.enter("steady_forward"); alloc(3000); alloc(-2000); meter.enter("steady_backward"); alloc(5000)
    alloc(-6000); meter.enter(None)
    assert phases["load"]["allocated_peak_bytes"] == 4000
    assert phases["forward"]["allocated_peak_bytes"] == 7000 and phases["forward"]["allocated_end_bytes"] == 5000
    assert phases["backward"]["allocated_peak_bytes"] == 10000
    assert phases["optimizer"]["allocated_peak_bytes"] == 4800
    assert phases["backward"]["nvml_process_peak_bytes"] == 500 + 10100
    profile = {"run": {"device": "cuda"}, "measurements": {"phases": phases, "step_times_s": [2.0, 1.0, 1.0],
                                                           "tokens_per_step": 2048}}
    runner._summarize(profile, {})
    peak = profile["measurements"]["peak"]
    assert peak["phase"] == "steady" and peak["bytes"] == 10800 and peak["reserved_bytes"] == 10900
    assert peak["nvml_process_bytes"] == 500 + 10900
    assert profile["measurements"]["tokens_per_s"] == 2048.0


def test_cuda_oom_is_recorded_with_the_bytes_asked_for():
    from memplan.profile import runner

    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has a total capacity of "
                                 "139.81 GiB of which 1.2 GiB is free.")
    rec = runner._oom_record(err, {"phase": "backward", "step": 0})
    assert rec["phase"] == "backward" and rec["kind"] == "cuda" and rec["requested_bytes"] == int(3.5 * 2**30)
    assert runner._oom_record(ValueError("nope"), {}) is None


def test_gpu_validation_plan_covers_the_grid_most_valuable_first():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_grid", ROOT / "scripts" / "gpu_grid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    plan = mod.plan()
    assert len(plan) == len({(m, tuple(sorted(o.items()))) for m, o in plan})  # no duplicates
    assert [m for m, _ in plan[:6]] == mod.MODELS + [mod.BIG]  # one canonical configuration per model first
    assert sum(m == mod.BIG for m, _ in plan) == 1  # one 70B configuration
    for m in mod.MODELS:
        got = {(o["seq_len"], o["gradient_checkpointing"], o["lora_r"]) for mm, o in plan if mm == m}
        assert got == {(s, c, r) for s in (512, 2048, 4096) for c in (True, False) for r in (16, 64)}
    from memplan.catalog import resolve_model

    for m in mod.MODELS + [mod.BIG]:
        resolve_model(m)
        tiny = mod.tiny_config(resolve_model(m).hf_config)
        assert tiny["num_hidden_layers"] == 2 and tiny["num_attention_heads"] % tiny["num_key_value_heads"] == 0


def test_show_and_recompare_stored_profiles(tmp_path, capsys):
    """A profile measured elsewhere (e.g. on a GPU with --no-trace) is printed and compared again here."""
    from memplan.cli import main

    prof = _valid_profile(model={"name": "tiny", "hf_config": dict(TINY)}, run={"device": "cuda", "steps": 3},
                          measurements={"phases": {"load": {"allocated_peak_bytes": 1000},
                                                   "forward": {"allocated_peak_bytes": 3 * 2**20}},
                                        "peak": {"phase": "forward", "bytes": 3 * 2**20,
                                                 "allocated_bytes": 3 * 2**20}})
    path = schema.write_json_atomic(tmp_path / "p.json", prof)
    assert main(["profile", "--show", str(path), "--recompare", "--no-trace", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    est = shown["comparison"]["estimate"]
    assert est["peak_bytes"] > 0 and est["error_pct"] is not None
    assert json.loads(path.read_text())["comparison"]["estimate"]["peak_bytes"] == est["peak_bytes"]
