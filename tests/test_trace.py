"""The meta trace: byte-for-byte equal to the same step on real CPU tensors, phases, attribution, attention."""
from __future__ import annotations

import json
import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.architectures import from_hf_config  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.spec import TrainSpec  # noqa: E402
from memplan.trace import run_trace  # noqa: E402
from memplan.trace.tracker import CATEGORIES, LiveBytesTracker, TrackerOutOfMemory  # noqa: E402

logging.disable(logging.WARNING)

TINY_LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
              "max_position_embeddings": 512, "tie_word_embeddings": False}
TINY_MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500, "num_local_experts": 4,
                "num_experts_per_tok": 2}
TINY_QWEN2_MOE = {"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500, "num_experts": 4,
                  "num_experts_per_tok": 2}


def spec(cfg, name="tiny"):
    return from_hf_config(cfg, name, "test")


@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_MIXTRAL, TINY_QWEN2_MOE], ids=["llama", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("train", [
    TrainSpec(seq_len=64),
    TrainSpec(seq_len=64, bits=16, gradient_checkpointing=False, attention="eager"),
    TrainSpec(seq_len=48, batch_size=2, optimizer="adamw-8bit", lora_targets="attn"),
    TrainSpec(seq_len=32, bits=16, dora=True, optimizer="sgd", lora_targets="qv"),
], ids=["qlora", "lora16-eager-nockpt", "adamw8bit-attn", "dora16-sgd"])
def test_meta_equals_real_cpu_byte_for_byte(cfg, train):
    meta = run_trace(spec(cfg), train)
    real = run_trace(spec(cfg), train, real=True)
    assert meta.peak_bytes == real.peak_bytes
    assert meta.components == real.components
    assert meta.phases == real.phases
    assert meta.peak_phase == real.peak_phase


TINY_FALCON_MQA = {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "vocab_size": 500, "alibi": False, "bias": False, "multi_query": True,
                   "new_decoder_architecture": False, "parallel_attn": True}  # Falcon-7B's layout: 1 K/V head


def test_falcon_multi_query_runs_sdpa_math_fallback():
    # transformers calls SDPA with 1 K/V head and no enable_gqa: PyTorch's fused kernels reject it and SDPA runs
    # its math kernel on CUDA too, so the trace must keep b·a·s² fp32 attention probabilities per layer.
    m = spec(TINY_FALCON_MQA)
    s, a, layers = 128, 4, 2
    train = TrainSpec(seq_len=s, bits=32, gradient_checkpointing=False)
    meta = run_trace(m, train)
    assert any("math kernel" in n for n in meta.notes)
    assert meta.components["activations"] >= layers * a * s * s * 4
    real = run_trace(m, train, real=True)
    # same bytes but for Falcon's list indexing (fused_qkv[..., [-2], :]): CPU builds an 8-byte int64 index
    # tensor per index per layer that meta does not
    assert 0 <= real.peak_bytes - meta.peak_bytes <= 16 * layers
    assert real.phases.keys() == meta.phases.keys()
    qlora = run_trace(m, TrainSpec(seq_len=64))
    assert qlora.peak_bytes > 0


def test_dora_4bit_meta_equals_real_cpu():
    train = TrainSpec(seq_len=32, dora=True)
    meta = run_trace(spec(TINY_LLAMA), train)
    real = run_trace(spec(TINY_LLAMA), train, real=True)
    assert meta.peak_bytes == real.peak_bytes
    assert meta.components == real.components
    assert meta.phases == real.phases


def test_components_sum_to_peak_and_phases():
    r = run_trace(spec(TINY_LLAMA), TrainSpec(seq_len=64))
    assert set(r.components) == set(CATEGORIES)
    assert sum(r.components.values()) == r.peak_bytes
    assert set(r.phases) == {"load", "forward", "backward", "optimizer"}
    assert max(r.phases.values()) == r.peak_bytes == r.phases[r.peak_phase]
    # two steps: the steady-state forward holds the AdamW states (2 fp32 per trainable parameter)
    assert r.components["optimizer_states"] >= 2 * 4 * r.params_trainable
    assert r.components["lora"] == 4 * r.params_trainable  # adapters in fp32
    assert r.components["weights_quantized"] > 0 and r.components["quant_state"] > 0
    assert r.top_tensors[0]["bytes"] >= r.top_tensors[-1]["bytes"]
    d = r.to_dict()
    assert {"model", "params", "config", "components", "peak_bytes", "device_total_bytes", "peak_phase",
            "phases", "top_tensors"} <= set(d)
    assert d["device_total_bytes"] is None
    json.dumps(d)


def test_param_count_matches_spec():
    m = spec(TINY_LLAMA)
    r = run_trace(m, TrainSpec(seq_len=16, bits=16))
    assert r.params_total == m.total_params


def test_sdpa_keeps_no_scores_eager_does():
    m = spec(TINY_LLAMA)
    s, a = 256, 4
    fused = run_trace(m, TrainSpec(seq_len=s, bits=16, gradient_checkpointing=False))
    eager = run_trace(m, TrainSpec(seq_len=s, bits=16, gradient_checkpointing=False, attention="eager"))
    # eager saves b·a·s² attention probabilities per layer (and more); sdpa saves O(s) per layer
    assert eager.components["activations"] - fused.components["activations"] >= 2 * a * s * s * 2
    assert eager.peak_bytes > fused.peak_bytes


def test_checkpointing_saves_activation_memory():
    m = spec(TINY_LLAMA)
    on = run_trace(m, TrainSpec(seq_len=256, bits=16))
    off = run_trace(m, TrainSpec(seq_len=256, bits=16, gradient_checkpointing=False))
    assert on.phases["forward"] < off.phases["forward"]


def test_budget_raises_simulated_oom():
    m = spec(TINY_LLAMA)
    with pytest.raises(TrackerOutOfMemory) as info:
        run_trace(m, TrainSpec(seq_len=64), budget_bytes=2_000_000)
    e = info.value
    assert e.requested_bytes > 0 and e.live_bytes + e.requested_bytes > 2_000_000
    assert e.phase in ("load", "forward", "backward", "optimizer")


def test_tracker_counts_views_once_and_releases():
    tr = LiveBytesTracker()
    with tr:
        tr.phase = "forward"
        x = torch.empty(1000)
        y = x[10:]  # a view: no new bytes
        assert tr.current == 4000
        del x, y
        assert tr.current == 0
    assert tr.peak == 4000 and tr.phase_peaks["forward"] == 4000


def test_bad_lora_target_is_a_memplan_error():
    with pytest.raises(MemplanError, match="no module named"):
        run_trace(spec(TINY_LLAMA), TrainSpec(seq_len=16, lora_targets=("nope_proj",)))


def test_cli_json_and_timeline(tmp_path, capsys):
    from memplan.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    csv_path, png = tmp_path / "t.csv", tmp_path / "t.png"
    rc = main(["trace", str(cfg), "-s", "32", "--json", "--timeline", str(csv_path), "--plot", str(png)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_bytes"] == sum(out["components"].values())
    assert csv_path.read_text().startswith("event,live_bytes,live_gib,phase,step")
    assert png.stat().st_size > 1000


def test_cli_unknown_model_is_one_line_error(capsys):
    from memplan.cli import main

    assert main(["trace", "no-such-model-xyz"]) == 2
    assert "error" in capsys.readouterr().err
