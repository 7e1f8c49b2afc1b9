"""`memplan calibrate`, the calibrated estimate, and `memplan validate --against profiles`.

No GPU is needed. The GPU profiles here are SYNTHETIC TEST FIXTURES: memplan.profile/1 documents written by this
test into tmp_path (never under profiles/), with figures built from known overheads so that the fit can be checked
against them. Each is marked `"synthetic_test_fixture": true` and its model.source says so. They are not
measurements and no figure in them describes a real GPU. The CPU profiles are real: `memplan profile --device cpu`
on a tiny Llama config written by the test (as tests/test_profile.py does).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memplan import calibrate as cal
from memplan.cli import main
from memplan.profile import schema
from memplan.spec import TrainSpec

ROOT = Path(__file__).resolve().parents[1]
MiB, GiB = 2**20, 2**30
TINY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024,
        "tie_word_embeddings": False}
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "pandas", "matplotlib", "numpy")

# the known overheads the synthetic fixtures are built from
CONTEXT, SLOPE, INTERCEPT, WORKSPACE = 517 * MiB, 1.07, 150 * MiB, 40 * MiB
FIXTURE_GPU = {"name": "NVIDIA H100 80GB HBM3", "catalog": "h100-sxm", "total_bytes": 85_520_809_984}


def synthetic_gpu_profile(i: int, allocated: int, *, status: str = "ok", noise: int = 0, gpu: dict = FIXTURE_GPU,
                          context: int = CONTEXT) -> dict:
    """SYNTHETIC TEST FIXTURE, not a measurement: a memplan.profile/1 CUDA profile whose figures follow
    reserved = SLOPE * allocated + INTERCEPT (+ noise), NVML process = reserved + context + WORKSPACE."""
    train = TrainSpec(seq_len=256 * (i + 1), lora_r=8).to_dict()
    run = {"device": "cuda", "steps": 3, "load_path": "direct", "weights_dir": None, "weights_cache": None,
           "cpu_budget_bytes": None, "memory_fraction": None, "kernels": None, "seed": i}
    reserved = int(SLOPE * allocated + INTERCEPT) + noise
    baseline = 3 * MiB
    process = reserved + context + WORKSPACE

    def phase(frac):
        a = int(allocated * frac)
        return {"seconds": 0.1, "allocated_peak_bytes": a, "reserved_peak_bytes": int(SLOPE * a + INTERCEPT),
                "allocated_end_bytes": a // 2, "reserved_end_bytes": int(SLOPE * a + INTERCEPT),
                "nvml_used_peak_bytes": int(SLOPE * a + INTERCEPT) + context + WORKSPACE + baseline,
                "nvml_process_peak_bytes": int(SLOPE * a + INTERCEPT) + context + WORKSPACE}

    phases = {"load": phase(0.5), "forward": phase(0.8), "backward": phase(1.0), "optimizer": phase(0.9),
              "steady_forward": phase(0.8), "steady_backward": phase(1.0), "steady_optimizer": phase(0.9)}
    phases["backward"]["reserved_peak_bytes"] = reserved
    phases["backward"]["nvml_process_peak_bytes"] = process
    phases["backward"]["nvml_used_peak_bytes"] = process + baseline
    phases["steady"] = dict(phases["steady_backward"])
    created = f"2030-01-01T00:00:{i:02d}+00:00"
    key = schema.profile_key("synthetic-llama", TINY, train, "cuda", run)
    return {
        "schema": schema.SCHEMA, "synthetic_test_fixture": True, "key": key, "created": created,
        "finished": created, "status": status,
        "model": {"name": "synthetic-llama", "source": "SYNTHETIC TEST FIXTURE (tests/test_calibrate.py)",
                  "hf_config": dict(TINY)},
        "train": train, "run": run,
        "measurements": {
            "phases": phases,
            "peak": {"phase": "backward", "bytes": allocated, "measure": "allocated_peak_bytes",
                     "allocated_bytes": allocated, "reserved_bytes": reserved, "nvml_used_bytes": process + baseline,
                     "nvml_process_bytes": process},
            "cuda_context_bytes": context, "nvml_baseline_used_bytes": baseline,
            "nvml_total_bytes": gpu["total_bytes"],
        },
        "oom": {"phase": "backward", "step": 0, "kind": "cuda", "message": "fixture", "requested_bytes": GiB}
        if status == "oom" else None,
        "error": None,
        "comparison": {},
        "environment": {
            "versions": {"python": "3.12.0", "torch": "9.9.9-fixture", "transformers": "9.9.9-fixture",
                         "peft": "9.9.9-fixture", "bitsandbytes": "9.9.9-fixture", "memplan": "fixture"},
            "platform": {"system": "Linux", "machine": "x86_64"}, "cpu_count": 2,
            "driver": "000.00-fixture", "torch_cuda": "0.0-fixture", "torch_cuda_available": True,
            "gpus": [{"index": 0, "name": gpu["name"], "uuid": "GPU-fixture", "total_bytes": gpu["total_bytes"],
                      "cuda_driver": "0.0-fixture", "catalog": gpu["catalog"], "catalog_match": "name and memory"}],
        },
    }


def write_fixtures(folder: Path, profiles: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    assert ROOT not in folder.resolve().parents  # fixtures live in tmp_path, never in the repository
    for i, p in enumerate(profiles):
        (folder / f"synthetic-fixture_{i:02d}.json").write_text(json.dumps(p))
    return folder


SIZES = [2 * GiB, 5 * GiB, 11 * GiB, 23 * GiB, 40 * GiB, 61 * GiB]
NOISE = [3 * MiB, -5 * MiB, 4 * MiB, -2 * MiB, 6 * MiB, -6 * MiB]  # deterministic, zero-mean


@pytest.fixture
def cal_dir(tmp_path, monkeypatch):
    folder = tmp_path / "calibrations"
    monkeypatch.setenv(cal.ENV_DIR, str(folder))
    cal.select.cache_clear()
    yield folder
    cal.select.cache_clear()


@pytest.fixture
def gpu_fixtures(tmp_path):
    profiles = [synthetic_gpu_profile(i, a, noise=n) for i, (a, n) in enumerate(zip(SIZES, NOISE))]
    profiles.append(synthetic_gpu_profile(9, 79 * GiB, status="oom", noise=20 * GiB))  # excluded from the fit
    return write_fixtures(tmp_path / "fixtures", profiles)


# ------------------------------------------------------------------------------------------------ the fit

def test_linear_fit_exact():
    a, b = cal.linear_fit([1.0, 2.0, 4.0], [3.0, 5.0, 9.0])
    assert a == pytest.approx(2.0) and b == pytest.approx(1.0)
    assert cal.linear_fit([5.0], [7.0]) == (1.0, 2.0)


def test_calibrate_recovers_known_overheads(gpu_fixtures, cal_dir, capsys):
    assert main(["calibrate", str(gpu_fixtures)]) == 0
    out = capsys.readouterr().out
    (path,) = list(cal_dir.glob("*.json"))
    assert path.name.startswith("h100-sxm_") and str(path) in out
    doc = json.loads(path.read_text())
    assert cal.validate(doc) is None and doc["schema"] == "memplan.calibration/1" and doc["units"] == "bytes"
    ov, fit = doc["overheads"], doc["fit"]
    assert ov["cuda_context_bytes"] == CONTEXT
    assert ov["cublas_workspace_bytes"] == pytest.approx(WORKSPACE, abs=8 * MiB)
    assert fit["allocator"]["slope"] == pytest.approx(SLOPE, abs=2e-4)
    assert ov["allocator_fraction"] == pytest.approx(SLOPE - 1, abs=2e-4)
    assert ov["allocator_intercept_bytes"] == pytest.approx(INTERCEPT, abs=8 * MiB)
    assert 0 < fit["allocator"]["rms_residual_bytes"] < 8 * MiB and fit["allocator"]["n"] == 6
    assert fit["allocator"]["allocated_range_bytes"] == [min(SIZES), max(SIZES)]
    assert fit["device_total"]["max_abs_error_pct"] < 0.5
    prov = doc["provenance"]
    assert prov["n_profiles"] == 6 and prov["excluded"] == {"oom": 1}
    assert doc["gpu"]["name"] == FIXTURE_GPU["name"] and doc["gpu"]["catalog"] == "h100-sxm"
    assert prov["driver"] == "000.00-fixture" and prov["torch_cuda"] == "0.0-fixture"
    assert set(prov["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes"}
    assert len(prov["profiles"]) == 6 and all(p["file"].startswith("synthetic-fixture_") for p in prov["profiles"])


def test_one_profile_fixes_the_slope(tmp_path, cal_dir):
    folder = write_fixtures(tmp_path / "one", [synthetic_gpu_profile(0, 8 * GiB)])
    ((path, doc),) = cal.calibrate([str(folder)], out=str(tmp_path / "mine.json"))
    assert path.name == "mine.json" and doc["name"] == "mine"
    assert doc["fit"]["allocator"]["slope"] == 1.0 and doc["notes"]
    assert doc["overheads"]["allocator_intercept_bytes"] == int(SLOPE * 8 * GiB + INTERCEPT) - 8 * GiB


def test_one_calibration_per_gpu(tmp_path, cal_dir):
    a100 = {"name": "NVIDIA A100-SXM4-80GB", "catalog": "a100-80gb", "total_bytes": 85_899_345_920}
    profiles = [synthetic_gpu_profile(i, s) for i, s in enumerate(SIZES[:3])]
    profiles += [synthetic_gpu_profile(i + 3, s, gpu=a100, context=400 * MiB) for i, s in enumerate(SIZES[:3])]
    folder = write_fixtures(tmp_path / "two", profiles)
    written = cal.calibrate([str(folder)])
    assert sorted(d["gpu"]["catalog"] for _, d in written) == ["a100-80gb", "h100-sxm"]
    by = {d["gpu"]["catalog"]: d for _, d in written}
    assert by["a100-80gb"]["overheads"]["cuda_context_bytes"] == 400 * MiB
    with pytest.raises(Exception, match="2 GPUs"):
        cal.calibrate([str(folder)], out=str(tmp_path / "x.json"))


# ---------------------------------------------------------------------------------- the calibrated estimate

def _estimate_json(*argv) -> dict:
    return json.loads(_run_main(["estimate", "llama-2-7b", "--json", *argv]))


def _run_main(argv) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


def test_estimate_uses_the_calibration(gpu_fixtures, cal_dir, capsys):
    default = _estimate_json("--no-calibration")
    assert default["overhead_source"].startswith("default")
    ((path, doc),) = cal.calibrate([str(gpu_fixtures)])
    d = _estimate_json()
    assert d["overhead_source"].startswith(f"calibration {doc['name']} (h100-sxm, 6 profiles")
    ov = doc["overheads"]
    assert d["device_overheads"]["cuda_context"] == ov["cuda_context_bytes"]
    assert d["device_overheads"]["cublas_workspace"] == ov["cublas_workspace_bytes"]
    assert d["device_overheads"]["allocator_overhead"] == int(
        ov["allocator_fraction"] * d["peak_bytes"] + ov["allocator_intercept_bytes"])
    assert d["device_total_bytes"] == d["peak_bytes"] + sum(d["device_overheads"].values())
    assert d["peak_bytes"] == default["peak_bytes"]  # calibration changes device overheads only
    # --no-calibration turns it off; --gpu picks that GPU's calibration or none
    assert _estimate_json("--no-calibration")["overhead_source"] == default["overhead_source"]
    assert _estimate_json("--gpu", "h100-sxm")["overhead_source"] == d["overhead_source"]
    assert _estimate_json("--gpu", "a100-80gb")["overhead_source"] == default["overhead_source"]
    assert _estimate_json("--calibration", str(path))["overhead_source"] == d["overhead_source"]
    assert _estimate_json("--calibration", doc["name"])["overhead_source"] == d["overhead_source"]
    # the table says which calibration it used
    text = _run_main(["estimate", "llama-2-7b"])
    assert f"device overheads: calibration {doc['name']}" in " ".join(text.split())
    text = _run_main(["estimate", "llama-2-7b", "--gpu", "a100-80gb"])
    assert "no usable calibration for a100-80gb" in " ".join(text.split())


def test_calibrated_estimate_imports_nothing_heavy(gpu_fixtures, cal_dir):
    cal.calibrate([str(gpu_fixtures)])
    code = ("import sys, io, contextlib\nfrom memplan.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n    main(['estimate', 'llama-2-70b'])\n"
            "assert 'device overheads: calibration' in ' '.join(out.getvalue().split())\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_corrupted_calibrations_are_named_and_ignored(gpu_fixtures, cal_dir, capsys):
    cal_dir.mkdir(parents=True)
    bad = cal_dir / "h100-sxm_20991231T000000Z.json"  # the newest by name, and corrupted
    bad.write_text('{"schema": "memplan.calibration/1", "name": ')
    d = _estimate_json()
    assert d["overhead_source"].startswith("default")
    assert any(str(bad) in n and "corrupted JSON" in n for n in d["notes"])
    assert str(bad) in capsys.readouterr().err
    cal.select.cache_clear()
    foreign = cal_dir / "h100-sxm_20981231T000000Z.json"
    foreign.write_text(json.dumps({"schema": "memplan.calibration/1", "name": "x", "created": "", "gpu": {},
                                   "overheads": {"cuda_context_bytes": "lots"}, "provenance": {}}))
    ((_, doc),) = cal.calibrate([str(gpu_fixtures)])  # an older, valid one: used, the others named
    d = _estimate_json("--gpu", "h100-sxm")
    assert d["overhead_source"].startswith(f"calibration {doc['name']}")
    notes = " ".join(d["notes"])
    assert str(bad) in notes and str(foreign) in notes and "cuda_context_bytes is not a number" in notes
    # an explicit corrupted calibration is an error, not a silent fallback
    r = subprocess.run([sys.executable, "-m", "memplan", "estimate", "llama-2-7b", "--calibration", str(bad)],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr


# ------------------------------------------------------------------------------------- real CPU profiles

@pytest.fixture(scope="module")
def cpu_profiles(tmp_path_factory):
    """Two real CPU profiles of a tiny Llama (about 10 s each on 2 cores)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("cpu-profiles")
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEMPLAN_WEIGHTS_CACHE=str(root / "weights"))
    r = subprocess.run([sys.executable, "-m", "memplan", "profile", str(cfg), "--device", "cpu", "-s", "64,128",
                        "--steps", "2", "--kernels", "gpu", "--lora-r", "8", "--no-progress", "--threads", "2",
                        "--profiles", str(root / "profiles"), "--csv", "none"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted((root / "profiles").glob("*.json"))
    assert len(files) == 2
    return root / "profiles"


def test_cpu_profiles_are_refused(cpu_profiles, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEMPLAN_CALIBRATIONS=str(tmp_path / "cal"))
    r = subprocess.run([sys.executable, "-m", "memplan", "calibrate", str(cpu_profiles)], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    assert "no GPU profile given" in r.stderr and "CPU" in r.stderr
    assert not (tmp_path / "cal").exists()


def test_validate_against_cpu_profiles(cpu_profiles, tmp_path, cal_dir, capsys):
    pytest.importorskip("matplotlib")
    out_csv, fig = tmp_path / "reports" / "validation.csv", tmp_path / "reports" / "validation.png"
    out_csv.parent.mkdir()  # a missing folder given explicitly is an error (tests/test_outputs.py)
    assert main(["validate", "--against", "profiles", str(cpu_profiles), "--csv", str(out_csv),
                 "--figure", str(fig), "--cache", str(tmp_path / "cache")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 2
    from memplan.commands.validate import PROFILE_COLUMNS

    assert list(rows[0]) == PROFILE_COLUMNS
    for row in rows:
        assert row["device"] == "cpu" and int(row["measured_tracker_peak_bytes"]) > 0
        assert row["measured_tensor_peak_bytes"] == row["measured_tracker_peak_bytes"]
        assert row["measured_allocated_peak_bytes"] == "" and row["estimate_device_total_bytes"] == ""
        assert int(row["estimate_tensor_peak_bytes"]) > 0 and float(row["estimate_error_pct"]) == float(
            row["estimate_error_pct"])
        assert row["trace_source"] == "stored" and float(row["trace_error_pct"]) == 0.0  # --kernels gpu: byte-equal
    assert "need GPU profiles" in text and "trace vs the tracker" in text
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_against_gpu_fixtures(gpu_fixtures, cpu_profiles, tmp_path, cal_dir, capsys):
    """Synthetic GPU fixtures (no stored trace: the tiny model is traced) next to real CPU profiles."""
    pytest.importorskip("matplotlib")
    cal.calibrate([str(gpu_fixtures)])
    out_csv = tmp_path / "validation.csv"
    assert main(["validate", "--against", "profiles", str(gpu_fixtures), str(cpu_profiles), "--csv", str(out_csv),
                 "--figure", str(tmp_path / "v.png"), "--cache", str(tmp_path / "cache")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    rows = list(csv.DictReader(out_csv.open()))
    gpu_rows = [r for r in rows if r["device"] == "cuda"]
    assert len(gpu_rows) == 6 and len(rows) == 8  # the OOM fixture is left out
    assert "1 left out" in text and "device total vs NVML process peak" in text
    for r in gpu_rows:
        assert r["gpu"] == "h100-sxm" and r["calibration"].startswith("h100-sxm_")
        assert int(r["measured_reserved_peak_bytes"]) > int(r["measured_allocated_peak_bytes"])
        assert r["device_total_error_pct"] != "" and r["trace_source"] in ("run", "cached")
        assert int(r["trace_peak_bytes"]) > 0
