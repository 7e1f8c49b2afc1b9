"""Each estimate component against a figure worked out by hand from the formula's source (the arithmetic is in
the comments), plus the composition rules: phases, peak, totals, JSON shape."""
import pytest

from memplan.catalog import resolve_model
from memplan.estimate import COMPONENTS, PHASES, estimate
from memplan.estimate.activations import Ctx, layer_saved
from memplan.estimate.logits import loss_backward, loss_forward
from memplan.estimate.lora import adapter_params
from memplan.estimate.optimizer import states
from memplan.estimate.weights import weights
from memplan.errors import MemplanError
from memplan.spec import TrainSpec

L7 = resolve_model("llama-2-7b")  # h 4096, i 11008, 32 layers, 32 heads (MHA), V 32000


def test_nf4_double_quant_weights_llama2_7b():
    w = weights(L7, TrainSpec())
    # per layer 4*4096^2 + 3*4096*11008 = 202,375,168 weights; x32 = 6,476,005,376; two per byte
    assert w["weights_quantized"] == 6_476_005_376 // 2
    # absmax: 6,476,005,376/64 = 101,187,584 uint8; nested fp32 per 256 blocks: per layer
    # 4*(4096^2/64/256)*4 + 3*(4096*11008/64/256)*4 = 16,384 + 33,024 = 49,408 B, x32 = 1,581,056;
    # per tensor a fp32 offset (4 B), the 16-entry NF4 code (64 B) and the nested 256-entry map (1 KiB); 224 tensors
    assert w["quant_state"] == 101_187_584 + 1_581_056 + 224 * (4 + 64 + 1024) == 103_013_248  # = the trace
    # embed + lm_head 2*32000*4096 + norms 65*4096 = 262,410,240 params, fp32 after the upcast
    assert w["weights_unquantized"] == 262_410_240 * 4


def test_nf4_without_double_quant_and_int8():
    w = weights(L7, TrainSpec(double_quant=False))
    assert w["quant_state"] == 101_187_584 * 4 + 224 * 64
    w8 = weights(L7, TrainSpec(bits=8))
    assert w8["weights_quantized"] == 6_476_005_376
    # one fp32 scale per output row: per layer 4*4096 + 2*11008 + 4096 = 42,496 rows, x32
    assert w8["quant_state"] == 42_496 * 32 * 4


def test_upcast_off_and_16_bit_weights():
    assert weights(L7, TrainSpec(upcast=False))["weights_unquantized"] == 262_410_240 * 2
    w16 = weights(L7, TrainSpec(bits=16))
    assert w16["weights_quantized"] == 0 and w16["weights_unquantized"] == L7.total_params * 2
    assert weights(L7, TrainSpec(bits=32, method="full"))["weights_unquantized"] == L7.total_params * 4


def test_lora_params_by_target_set():
    # all-linear r=16: q,k,v,o 16*(4096+4096) each; gate, up, down 16*(4096+11008) each
    per_layer = 4 * 16 * 8192 + 3 * 16 * 15104
    assert adapter_params(L7, TrainSpec()) == 32 * per_layer == 39_976_960
    assert adapter_params(L7, TrainSpec(lora_targets="qv")) == 32 * 2 * 16 * 8192
    assert adapter_params(L7, TrainSpec(lora_targets="attn", lora_r=64)) == 32 * 4 * 64 * 8192
    assert adapter_params(L7, TrainSpec(lora_targets="q_proj+down_proj")) == 32 * 16 * (8192 + 15104)
    assert adapter_params(L7, TrainSpec(lora_targets="qv", dora=True)) == 32 * 2 * (16 * 8192 + 4096)
    with pytest.raises(MemplanError, match="match no linear"):
        adapter_params(L7, TrainSpec(lora_targets="wq"))


def test_optimizer_states():
    p = 39_976_960
    assert states(L7, TrainSpec(), p, 4 * p) == 8 * p  # AdamW: exp_avg + exp_avg_sq, fp32
    assert states(L7, TrainSpec(optimizer="sgd"), p, 4 * p) == 4 * p  # one momentum buffer
    # 8-bit AdamW: every LoRA tensor has >= 4096 elements: 2 uint8 states + 2 fp32 absmax per 256 elements
    blocks = sum(-(-n // 256) for n in [16 * 4096] * 8 + [16 * 4096, 16 * 11008] * 3 for _ in range(1))
    expected = 32 * (2 * (p // 32) + 2 * 4 * blocks) + 2 * 1024
    assert states(L7, TrainSpec(optimizer="adamw-8bit"), p, 4 * p) == expected
    assert states(L7, TrainSpec(optimizer="paged-adamw-8bit"), p, 4 * p) == expected
    # Adafactor factored moments: rows + cols per 2-D tensor, fp32
    per_layer = 4 * ((16 + 4096) + (4096 + 16)) + 2 * ((16 + 4096) + (11008 + 16)) + ((16 + 11008) + (4096 + 16))
    assert states(L7, TrainSpec(optimizer="adafactor"), p, 4 * p) == 32 * per_layer * 4


def test_llama_layer_saved_tensors_qlora():
    """Per token, one Llama-2-7B layer in the default QLoRA recipe (fp32 stream, fp32 adapters, dropout on):
    q,k,v,o,gate,up: dropout copy 4h + mask h + lora_A out 16*4 each (o's input is a*d = h);
    rotated q, k, v and the SDPA output 4h each, logsumexp 4*32; h1 4h; gate, up, act 4i each;
    down: dropout copy 4i + mask i + 64; two rsqrt 4 each.
    h terms: 3*5h + 4*4h + 5h + 4h + 2*5h = 50h; i terms: 3*4i + 5i = 17i; plus the layer input x (4h), which
    the fp32 RMSNorm saves itself. = 54h + 17i + 584 = 221,184 + 187,136 + 584. (The meta trace agrees to the
    byte: 48,456 B/token for the same recipe at h=512, i=1376.)"""
    sv = layer_saved(L7, L7.layers[0][1], Ctx.of(TrainSpec()))
    assert sv.total() == 408_904


def test_llama_layer_saved_tensors_16bit_no_dropout():
    """bf16 stream (e=2), fp32 adapters, no dropout: each adapted linear casts its input to fp32 (a saved copy,
    4x its width) and saves lora_A's output; RMSNorm saves a fp32 copy of its input (4h) and rsqrt."""
    sv = layer_saved(L7, L7.layers[0][1], Ctx.of(TrainSpec(bits=16, lora_dropout=0.0)))
    h, i = 4096, 11008
    casts = 6 * 4 * h + 4 * i + 7 * 64
    attn = 4 * 2 * h + 32 * 4  # q.rot, k.rot, v, out in bf16; lse fp32
    norms = 2 * (4 * h + 4)
    mlp = 3 * 2 * i  # gate, up, act in bf16
    assert sv.total() == casts + attn + norms + mlp


def test_eager_attention_keeps_scores():
    sdpa = layer_saved(L7, L7.layers[0][1], Ctx.of(TrainSpec(seq_len=1024))).total()
    eager = layer_saved(L7, L7.layers[0][1], Ctx.of(TrainSpec(seq_len=1024, attention="eager"))).total()
    # fp32 stream: the fp32 softmax (a*s*4 per token) replaces the SDPA output and logsumexp
    assert eager - sdpa == 32 * 1024 * 4 - (4 * 4096 + 32 * 4)


def test_loss_per_token():
    assert loss_forward(L7, TrainSpec()) == 32000 * (4 + 4)  # fp32 logits + log_softmax
    assert loss_forward(L7, TrainSpec(bits=16)) == 32000 * (2 + 4 + 4)  # bf16 logits, fp32 copy, log_softmax
    assert loss_backward(L7, TrainSpec()) == 32000 * 4 * 3


def test_full_finetune_optimizer_phase():
    est = estimate(L7, TrainSpec(bits=16, method="full"))
    p = L7.total_params
    # bf16 weights, bf16 grads, two bf16 AdamW states, foreach sqrt temporary: 2+2+4+2 bytes per parameter
    assert est.phases["optimizer"] == 10 * p
    assert est.peak_phase == "optimizer"


@pytest.mark.parametrize("train", [TrainSpec(), TrainSpec(gradient_checkpointing=False, seq_len=512),
                                   TrainSpec(bits=16, attention="eager"), TrainSpec(bits=8, optimizer="adamw-8bit")])
def test_composition(train):
    est = estimate(L7, train)
    assert set(est.phases) == set(PHASES)
    assert est.peak_bytes == max(est.phases.values()) == est.phases[est.peak_phase]
    assert sum(est.components.values()) == est.peak_bytes
    assert set(est.components) == set(COMPONENTS)
    assert est.device_total_bytes == est.peak_bytes + sum(est.device_overheads.values())
    d = est.to_dict()
    for key in ("model", "params", "config", "components", "peak_bytes", "device_total_bytes", "peak_phase", "phases"):
        assert key in d
    assert d["params"]["trainable"] == est.params_trainable and d["config"]["seq_len"] == train.seq_len


def test_checkpointing_stores_only_layer_inputs():
    on = estimate(L7, TrainSpec(seq_len=1024))
    off = estimate(L7, TrainSpec(seq_len=1024, gradient_checkpointing=False))
    # without checkpointing the forward keeps every layer's saved set: 32 x 392,520 B/token beyond the inputs
    assert off.phases["forward"] - on.phases["forward"] >= 31 * 392_520 * 1024
    assert on.peak_bytes < off.peak_bytes


def test_moe_experts_stay_unquantized():
    mix = resolve_model("mixtral-8x7b")
    w = weights(mix, TrainSpec())
    experts = sum(n * layer.expert_params for n, layer in mix.layers)
    assert w["weights_unquantized"] >= experts * 4  # fp32 after the upcast
    assert any("MoE" in n for n in estimate(mix, TrainSpec()).notes)


def test_the_settings_cache_never_changes_a_number():
    """What estimate() keeps per model and settings (estimate/__init__.py _settings: everything but the shape) gives
    the same estimate as computing it afresh: a seeded sample over every flag and catalog model, each at three
    shapes one after another (the cache warm), then cold."""
    import random
    from dataclasses import replace

    from memplan import estimate as est_mod
    from memplan.catalog import models
    from memplan.validation.sample import draw_configs

    rng = random.Random(3)
    names = [m["name"] for m in models().values() if not resolve_model(m["name"]).derived]
    checked = 0
    for index, name, train in draw_configs(4321, names):
        model = resolve_model(name)
        for _ in range(3):
            t = replace(train, seq_len=rng.choice([64, 1000, 9000]), batch_size=rng.choice([1, 2, 5]))
            warm = estimate(model, t).to_dict()
            est_mod._SETTINGS.clear()
            assert estimate(model, t).to_dict() == warm, (name, t)
            checked += 1
        if index >= 60:
            break
    assert checked >= 150


def test_activations_shared_across_batches_equal_their_own_walk():
    """activations() computes a configuration's per-token figures once at batch 1 and shares them with every batch
    (only rotary cos / sin, shared by the batch, differ): on a seeded sample over every flag and model, at several
    shapes, they equal those computed for that batch by _activations itself."""
    from memplan.catalog import models
    from memplan.estimate.activations import _activations, activations
    from memplan.validation.sample import draw_configs

    names = [m["name"] for m in models().values() if not resolve_model(m["name"]).derived]
    checked = 0
    for index, name, train in draw_configs(5151, names):
        model = resolve_model(name)
        for seq_len, batch in ((train.seq_len, train.batch_size), (37, 3), (4097, 6)):
            t = train.variant(seq_len=seq_len, batch_size=batch)
            try:
                expected = _activations(model, t)
            except MemplanError:
                continue
            assert activations(model, t) == expected, (name, t)
            checked += 1
        if index >= 60:
            break
    assert checked >= 150
