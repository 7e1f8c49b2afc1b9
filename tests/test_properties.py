"""Properties of the analytic estimate over random catalog models and training settings (hypothesis).

memplan fit bisects on sequence length, batch and LoRA rank because the estimate is monotone in them; these
properties are what make that search exact. A failure here is a counterexample to report against the
estimator (memplan/estimate/), not a reason to loosen the property.
"""
import math
import os
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from memplan.catalog import models, resolve_model
from memplan.errors import MemplanError
from memplan.estimate import COMPONENTS, PHASES, estimate
from memplan.estimate.activations import _int8_held, first_input_frozen, layer_totals
from memplan.estimate.dora import dora_transient
from memplan.spec import TrainSpec

# Models with a hand-written builder: a derived architecture's activation terms are fitted per setting to meta
# traces (memplan/derive; tests/test_derive.py checks them), too slow for a property search over settings.
MODEL_NAMES = sorted(e["name"] for e in models().values() if not resolve_model(e["name"]).derived)
WEIGHT_KEYS = ("weights_quantized", "quant_state", "weights_unquantized")
# The same examples every run (CI must not fail by chance); MEMPLAN_EXAMPLES=5000 MEMPLAN_RANDOM=1 pytest
# tests/test_properties.py for a deeper, random search (its failures are kept in .hypothesis/ and replayed)
SETTINGS = settings(max_examples=int(os.environ.get("MEMPLAN_EXAMPLES", 150)), deadline=None,
                    derandomize=not os.environ.get("MEMPLAN_RANDOM"), suppress_health_check=[HealthCheck.too_slow])


@lru_cache(maxsize=None)
def model(name):
    return resolve_model(name)


@st.composite
def train_specs(draw, method=None, bits=None):
    method = method or draw(st.sampled_from(["lora", "lora", "lora", "full"]))
    if bits is None:
        bits = draw(st.sampled_from([16, 32] if method == "full" else [4, 8, 16, 32]))
    return TrainSpec(
        bits=bits, method=method,
        quant_type=draw(st.sampled_from(["nf4", "fp4"])), double_quant=draw(st.booleans()),
        compute_dtype=draw(st.sampled_from(["bf16", "fp16"])), upcast=draw(st.booleans()),
        lora_r=draw(st.integers(1, 256)), lora_dropout=draw(st.sampled_from([0.0, 0.05, 0.1])),
        lora_targets=draw(st.sampled_from(["qv", "attn", "all-linear"])),
        lora_dtype=draw(st.sampled_from(["fp32", "bf16"])), dora=draw(st.booleans()),
        optimizer=draw(st.sampled_from(["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd",
                                        "adafactor"])),
        batch_size=draw(st.integers(1, 16)), seq_len=draw(st.integers(1, 32768)),
        gradient_checkpointing=draw(st.booleans()), attention=draw(st.sampled_from(["sdpa", "sdpa", "eager"])),
        modules_to_save=draw(st.sampled_from([(), (), ("lm_head",)])),
        transformers=draw(st.sampled_from([4, 5])),
    )


def est(name, spec):
    try:
        return estimate(model(name), spec)
    except MemplanError:  # a target set the architecture lacks: not a configuration
        assume(False)


names = st.sampled_from(MODEL_NAMES)


def not_lower(name, a, b):
    """estimate(b) >= estimate(a), on the tensor peak and on the device total."""
    ea, eb = est(name, a), est(name, b)
    assert eb.peak_bytes >= ea.peak_bytes, (name, a, b, ea.peak_bytes, eb.peak_bytes)
    assert eb.device_total_bytes >= ea.device_total_bytes


@SETTINGS
@given(names, train_specs(), st.integers(1, 8192))
def test_more_tokens_never_lower_the_peak(name, spec, extra):
    not_lower(name, spec, spec.with_(seq_len=spec.seq_len + extra))


@SETTINGS
@given(names, train_specs(), st.integers(1, 16))
def test_more_batch_never_lowers_the_peak(name, spec, extra):
    not_lower(name, spec, spec.with_(batch_size=spec.batch_size + extra))


def adapters_all_8bit(name, spec):
    """bitsandbytes 8-bit AdamW keeps 32-bit states for tensors under 4096 elements (Optimizer8bit.init_state,
    min_8bit_size): while a LoRA tensor crosses that line, a larger rank can *lower* the states (v_proj's lora_A
    at r=1, 1 x 3584, holds 8 B/element; at r=2, 2 B + block stats). The rank property holds where none does."""
    if "8bit" not in spec.optimizer:
        return True
    from memplan.estimate.lora import targeted
    return all(spec.lora_r * min(lin.in_features, lin.out_features) >= 4096 for _, lin in targeted(model(name), spec))


@SETTINGS
@given(names, train_specs(method="lora"), st.integers(1, 256))
def test_more_rank_never_lowers_the_peak(name, spec, extra):
    assume(adapters_all_8bit(name, spec))
    not_lower(name, spec, spec.with_(lora_r=spec.lora_r + extra))


def test_rank_inversion_under_8bit_threshold_is_real():
    """The counterexample hypothesis found, kept as a fact: r=1 -> 2 lowers the peak under 8-bit AdamW."""
    spec = TrainSpec(double_quant=False, upcast=False, lora_r=1, lora_dropout=0.0, lora_targets="qv",
                     lora_dtype="bf16", optimizer="adamw-8bit", seq_len=1, gradient_checkpointing=False)
    name = "deepseek-r1-distill-qwen-7b"
    assert est(name, spec.with_(lora_r=2)).peak_bytes < est(name, spec).peak_bytes


# More bits never lower the peak *within one recipe*. Two real effects cross recipes, and the estimator models
# them on purpose (each confirmed by the meta trace):
# - prepare_model_for_kbit_training (upcast on) applies to 4/8-bit only and makes the residual stream, the
#   non-quantized weights and MoE experts fp32: at long context or for MoE, QLoRA exceeds 16-bit LoRA;
# - 16-bit eager attention keeps softmax's fp32 output *and* its 16-bit cast; fp32 keeps one.
# - bitsandbytes' MatMul8bitLt keeps each 8-bit linear's input on its graph node (ctx.tensors), outside
#   saved-tensor hooks: with frozen 16-bit linears those inputs are freed, so 8-bit can exceed 16-bit.
# So the property is stated with upcast off and for 4 <= 8 and 4 <= 16.
@SETTINGS
@given(names, train_specs(method="lora"), st.sampled_from([(4, 8), (4, 16)]))
def test_more_bits_never_lower_the_peak(name, spec, pair):
    lo, hi = pair
    spec = spec.with_(upcast=False)
    not_lower(name, spec.with_(bits=lo), spec.with_(bits=hi))


@SETTINGS
@given(names, train_specs(method="lora"))
def test_weights_4bit_le_8bit_le_16bit(name, spec):
    spec = spec.with_(upcast=False)  # the same dtype for whatever is not quantized
    w = {b: sum(est(name, spec.with_(bits=b)).phase_components["load"][k] for k in WEIGHT_KEYS) for b in (4, 8, 16)}
    assert w[4] <= w[8] <= w[16], (name, spec, w)


def test_qlora_upcast_inversions_are_real():
    """With the default recipe, 16-bit LoRA can need less than QLoRA: MoE experts are unquantized 3-D parameters
    that the upcast makes fp32 (Mixtral-8x22B: ~508 GiB of weights in "4-bit", ~262 GiB in 16-bit), and the fp32
    residual stream dominates at long context (Llama-3-8B, 32k tokens)."""
    w4 = sum(est("mixtral-8x22b", TrainSpec()).phase_components["load"][k] for k in WEIGHT_KEYS)
    w16 = sum(est("mixtral-8x22b", TrainSpec(bits=16)).phase_components["load"][k] for k in WEIGHT_KEYS)
    assert w4 > 1.9 * w16
    assert est("llama-3-8b", TrainSpec(seq_len=32768, bits=8)).peak_bytes > est("llama-3-8b", TrainSpec(seq_len=32768, bits=16)).peak_bytes


@SETTINGS
@given(names, train_specs())
def test_checkpointing_never_raises_activations(name, spec):
    on = est(name, spec.with_(gradient_checkpointing=True))
    off = est(name, spec.with_(gradient_checkpointing=False))
    # What the forward keeps, and the peak. (Not every phase's component: at the first layer's backward,
    # checkpointing holds that layer's stored input *and* its recomputed saved set, while without it a 16-bit
    # RMSNorm keeps only its own fp32 copy of that input - h*2 bytes per token more, on a smaller total.)
    # The same effect bounds the peak: it may exceed by that one stored input (seen at seq_len 1, where the
    # first layer's backward with every gradient present sets the peak), plus the MLP product the recompute
    # leaves alive at the product's backward (estimate/activations.py _mlp_product_backward), and with DoRA the
    # weight-sized temporaries its recomputed forward makes again in backward (dora.dora_transient).
    # LLM.int8's linears keep their inputs as ctx attributes, all of them alive while a checkpointed layer
    # recomputes (activations._int8_held: under checkpointing every one but the layer input).
    assert on.phase_components["forward"]["activations"] <= off.phase_components["forward"]["activations"]
    m = model(name)
    widest = max(lin.out_features for _, layer in m.layers for lin in layer.linears)
    tokens = spec.batch_size * spec.seq_len
    one_stored_input = tokens * (m.hidden_size + widest) * 4
    int8 = tokens * max(_int8_held(m, layer, spec, True) for _, layer in m.layers) if spec.bits == 8 else 0
    # Without checkpointing a LoRA model's first layer gets an input that needs no gradient, so its ops on frozen
    # tensors save nothing (activations.first_input_frozen); checkpointing makes that input require grad.
    spec_off = spec.with_(gradient_checkpointing=False)
    first = m.layers[0][1]
    frozen = tokens * (layer_totals(m, first, spec_off)[0] - layer_totals(m, first, spec_off, True)[0]) \
        if first_input_frozen(m, spec_off) else 0
    assert on.peak_bytes <= off.peak_bytes + one_stored_input + int8 + dora_transient(m, spec) + frozen


@SETTINGS
@given(names, train_specs())
def test_totals_are_finite_non_negative_and_add_up(name, spec):
    e = est(name, spec)
    numbers = [*e.components.values(), *e.phases.values(), *e.device_overheads.values(), e.peak_bytes,
               e.device_total_bytes, e.params_total, e.params_trainable]
    numbers += [v for pc in e.phase_components.values() for v in pc.values()]
    for v in numbers:
        assert isinstance(v, int) and not isinstance(v, bool)
        assert math.isfinite(v) and v >= 0, (name, spec, v)
    assert set(e.components) == set(COMPONENTS)
    assert sum(e.components.values()) == e.peak_bytes
    for phase in PHASES:
        assert sum(e.phase_components[phase].values()) == e.phases[phase]
    assert e.peak_bytes == max(e.phases.values()) == e.phases[e.peak_phase]
    assert e.device_total_bytes >= e.peak_bytes
    assert e.device_total_bytes == e.peak_bytes + sum(e.device_overheads.values())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_catalog_model_default_recipe_is_sane(name):
    e = estimate(model(name), TrainSpec())
    assert 0 < e.peak_bytes <= e.device_total_bytes
    assert sum(e.components.values()) == e.peak_bytes
