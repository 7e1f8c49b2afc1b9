"""The library stack: every result names the versions it describes; --transformers 4|5 changes what is modelled;
the trace and profile refuse a major that is not installed, and run under transformers 4 in its own environment."""
from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memplan import stack as stack_mod
from memplan.catalog import resolve_model
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.estimate import estimate
from memplan.spec import TrainSpec

ROOT = Path(__file__).resolve().parents[1]
TF4_VENV = Path(os.environ.get("MEMPLAN_TF4_VENV", Path.home() / ".cache" / "memplan" / "venv-tf4"))
TF4_PYTHON = TF4_VENV / "bin" / "python"


def _installed(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(*argv, python=sys.executable, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([str(python), "-m", "memplan", *argv], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_stack_is_read_from_package_metadata_without_torch():
    code = ("import json, sys\nfrom memplan.stack import stack\n"
            "print(json.dumps(stack(0)))\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    st = json.loads(lines[0])
    assert lines[1] == "False"
    for name in stack_mod.PACKAGES:
        assert st[name] == (_installed(name) or stack_mod.LATEST[name])


def _clear():
    for f in (stack_mod.installed, stack_mod.installed_major, stack_mod.stack):
        f.cache_clear()


def test_nothing_installed_means_the_latest_supported(monkeypatch):
    monkeypatch.setattr(stack_mod, "_version", lambda name: None)
    _clear()
    try:
        st = stack_mod.stack(0)
        assert {p: st[p] for p in stack_mod.PACKAGES} == stack_mod.LATEST
        assert set(st["source"].values()) == {"not installed: latest supported"}
        assert stack_mod.installed_major() == 5
        assert TrainSpec().transformers == 5
    finally:
        monkeypatch.undo()
        _clear()


def test_versions_are_read_as_importlib_metadata_reads_them(tmp_path, monkeypatch):
    """stack._version scans sys.path for NAME-VERSION.dist-info itself (importlib.metadata's import is 50 ms of
    start-up): the first one along the path wins, as with importlib.metadata, and it agrees with it."""
    info = tmp_path / "peft-9.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 9.9.9\n\nVersion: 1.0 (body)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert stack_mod._version("peft") == importlib.metadata.version("peft") == "9.9.9"
    monkeypatch.undo()
    for name in stack_mod.PACKAGES + ("rich", "no-such-package-here"):
        assert stack_mod._version(name) == _installed(name)


def test_override_names_the_last_release_of_that_major():
    other = 4 if stack_mod.installed_major() == 5 else 5
    st = stack_mod.stack(other)
    assert st["transformers"] == stack_mod.RELEASES[other]
    assert st["source"]["transformers"].startswith(f"--transformers {other}")
    assert TrainSpec(transformers=other).transformers == other
    assert TrainSpec().transformers == stack_mod.installed_major()
    with pytest.raises(MemplanError, match="unsupported transformers 3"):
        TrainSpec(transformers=3)


def test_every_result_names_its_stack(tmp_path, capsys):
    have = _installed("transformers") or stack_mod.LATEST["transformers"]
    assert main(["estimate", "llama-2-7b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stack"]["transformers"] == have
    assert main(["estimate", "llama-2-7b"]) == 0
    assert f"stack: transformers {have}" in capsys.readouterr().out.replace("\n", " ")
    path = tmp_path / "rows.csv"
    assert main(["sweep", "llama-2-7b", "--seq-len", "512,1024", "--transformers", "4,5", "--out", str(path)]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(path.open()))
    assert {(r["transformers"], r["transformers_version"]) for r in rows} == {
        ("4", stack_mod.stack(4)["transformers"]), ("5", stack_mod.stack(5)["transformers"])}
    assert all(r["peft_version"] and r["bitsandbytes_version"] and r["torch_version"] for r in rows)
    assert main(["fit", "llama-2-7b", "--gpu", "a100-80gb", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stack"]["transformers"] == have
    assert main(["gpus", "llama-2-7b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stack"]["transformers"] == have


def test_mixtral_experts_by_major():
    """transformers 4: experts and router are Linear4bit; the weight bytes equal the transformers 4.57.6 meta trace
    of Mixtral-8x7B (QLoRA r16 q,k,v,o, batch 4 x 4096: scripts/validate_tf4.py's environment) to the byte.
    transformers 5: the fused 3-D experts stay unquantized and fp32 after the upcast (bitsandbytes issue #1849)."""
    model = resolve_model("mixtral-8x7b")
    train = dict(lora_targets="attn", batch_size=4, seq_len=4096, lora_dropout=0.1)
    tf4 = estimate(model, TrainSpec(**train, transformers=4))
    c = tf4.components
    assert (c["weights_quantized"], c["quant_state"], c["lora"]) == (23220191232, 737982336, 54525952)
    assert 0 <= 1049641216 - c["weights_unquantized"] <= 256  # the trace also counts rotary inv_freq (64 fp32)
    assert tf4.params_trainable == 13631488
    tf5 = estimate(model, TrainSpec(**train, transformers=5))
    experts = sum(n * layer.expert_params for n, layer in model.layers)
    assert tf5.components["weights_unquantized"] >= experts * 4
    assert tf5.peak_bytes > 4 * tf4.peak_bytes
    assert any("transformers 4 builds MoE experts" in n for n in tf4.notes)
    # all-linear reaches every expert and the router under 4.x: 8 experts x (w1, w3: h->i; w2: i->h) + gate
    h, i = model.hidden_size, 14336
    r = 16
    per_layer_4 = 8 * r * (2 * (h + i) + (i + h)) + r * (h + 8)
    lin4 = estimate(model, TrainSpec(transformers=4)).params_trainable
    lin5 = estimate(model, TrainSpec(transformers=5)).params_trainable
    assert lin4 - lin5 == model.num_layers * per_layer_4


def test_falcon_linears_are_quantized_under_transformers_4():
    """4.x replace_with_bnb_linear converts every nn.Linear instance (FalconLinear included); 5.x only exact
    nn.Linear."""
    model = resolve_model("falcon-7b")
    q4 = estimate(model, TrainSpec(transformers=4)).components["weights_quantized"]
    q5 = estimate(model, TrainSpec(transformers=5)).components["weights_quantized"]
    assert q5 == 0 and q4 > 2 * 2**30


def test_trace_and_profile_refuse_a_major_that_is_not_installed():
    other = "4" if stack_mod.installed_major() == 5 else "5"
    for cmd in (["trace", "llama-2-7b"], ["profile", "llama-2-7b", "--device", "cpu", "--csv", "none"]):
        out = run(*cmd, "--transformers", other)
        assert out.returncode == 2
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert f"--transformers {other}" in out.stderr and "setup_tf4_env.sh" in out.stderr


TF4_CHECK = r"""
import json, logging
logging.disable(logging.WARNING)
from memplan.architectures import from_hf_config
from memplan.estimate import estimate
from memplan.spec import TrainSpec
from memplan.trace import run_trace
LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500, "num_local_experts": 4,
           "num_experts_per_tok": 2}
out = {}
for name, cfg in (("llama", LLAMA), ("mixtral", MIXTRAL)):
    m = from_hf_config(cfg, name, "test")
    t = TrainSpec(seq_len=64)
    meta, real = run_trace(m, t), run_trace(m, t, real=True)
    out[name] = {"meta": meta.to_dict(), "real": real.to_dict(), "estimate": estimate(m, t).to_dict()}
print(json.dumps(out))
"""


@pytest.mark.skipif(not TF4_PYTHON.exists(), reason=f"no transformers-4 environment at {TF4_VENV} "
                    "(scripts/setup_tf4_env.sh sets it up; MEMPLAN_TF4_VENV names another)")
def test_trace_runs_under_transformers_4():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([str(TF4_PYTHON), "-c", TF4_CHECK], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in res.items():
        assert r["meta"]["stack"]["transformers"].startswith("4."), name
        assert r["meta"]["config"]["transformers"] == 4 and r["estimate"]["config"]["transformers"] == 4
        for part in ("weights_quantized", "quant_state", "lora"):
            assert r["meta"]["components"][part] == r["estimate"]["components"][part], (name, part)
        unq = r["meta"]["components"]["weights_unquantized"] - r["estimate"]["components"]["weights_unquantized"]
        assert 0 <= unq <= 256, (name, unq)  # the rotary inv_freq buffer, which the estimate leaves out
    llama = res["llama"]
    assert llama["meta"]["peak_bytes"] == llama["real"]["peak_bytes"]  # meta == real CPU, byte for byte
    assert llama["meta"]["components"] == llama["real"]["components"]
    # MoE: meta routes balanced, the random real model does not: the same weights, peaks within 1%
    mix = res["mixtral"]
    assert abs(mix["meta"]["peak_bytes"] - mix["real"]["peak_bytes"]) / mix["real"]["peak_bytes"] < 0.01
    assert mix["meta"]["params"]["trainable"] == mix["estimate"]["params"]["trainable"]
