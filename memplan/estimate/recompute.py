"""A checkpointed layer's recompute in backward: the moments where it peaks, per token.

torch/utils/checkpoint.py (non-reentrant) reruns the layer's forward when backward first unpacks a saved tensor
and stops early once the last one is repacked; these terms list what is alive at the widest moments of that rerun,
from the saved set saved_set.layer_saved() walks. activations._per_layer() collects them per layer.
"""
from __future__ import annotations

from functools import lru_cache

from memplan.estimate import saved_set
from memplan.estimate import dora
from memplan.estimate.experts import linear_experts
from memplan.estimate.lora import is_target
from memplan.spec import LayerSpec, ModelSpec, TrainSpec


@lru_cache(maxsize=4096)
def lora_add(model: ModelSpec, layer: LayerSpec, train: TrainSpec) -> int:
    """A checkpointed layer's recompute (in backward) as it reaches an adapted linear's LoRA add, per token: what the
    recompute has saved so far (the saved set in forward order, up to that linear's lora_A output) plus the add's
    tensors. bitsandbytes' LoRA layers (peft/tuners/lora/bnb.py 0.21, Linear4bit / Linear8bitLt.forward): the base
    result, the LoRA output cast to its dtype and scaled, and their sum, three output-wide tensors in the result's
    dtype; PEFT's plain Linear (layer.py): result, scaled LoRA output and the sum in their promoted dtype. The input
    cast to the adapter dtype is a local still alive. The widest such moment of the layer; 0 without LoRA."""
    ctx = saved_set.Ctx.of(train, model)
    if train.method != "lora" or train.dora:
        return 0
    sv = saved_set.layer_saved(model, layer, ctx)
    order = [n for n in sv.kept if n != "x"]
    e = ctx.e
    result = "fp32" if e == 4 else train.compute_dtype
    best = 0
    for lin in layer.linears:
        if not is_target(lin, train) or f"{lin.name}.A" not in sv.kept:
            continue
        before = sum(sv.size[n] for n in order[: order.index(f"{lin.name}.A") + 1])
        if train.quantized and lin.quantizable:
            add = 3 * e
        else:
            promoted = 4 if {result, train.lora_dtype} == {"fp16", "bf16"} else max(e, ctx.lb)
            add = e + ctx.lb + max(ctx.lb, promoted)
        cast = lin.in_features * ctx.lb if saved_set.casts(train, e) else 0
        best = max(best, before + lin.out_features * add + cast + _gate_side(layer, lin, ctx)
                   + _int8_inputs_before(sv, lin))
    return best


def _int8_inputs_before(sv: saved_set.Saved, lin) -> int:
    """The recompute's LLM.int8 inputs up to `lin` that its saved set does not hold: MatMul8bitLt keeps them in
    ctx.tensors, outside autograd's saves (bitsandbytes autograd/_functions.py 0.50), so the rerun's copies stay
    beside the forward's (a norm's output feeding q/k/v or gate/up). The meta trace: seed 131337 draw 26."""
    names = []
    for mark in sv.marks:
        if mark[1] in sv.int8_inputs and mark[1] not in sv.kept:
            names.append(mark[1])
        if mark[0] is lin:
            break
    return sum(sv.size[n] for n in dict.fromkeys(names))


def _gate_side(layer: LayerSpec, lin, ctx: saved_set.Ctx) -> int:
    """At up_proj's add in a gated MLP (LlamaMLP et al.: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`), the
    gate's side waits, saved only later in the order: Liger's SiLU-mul argument, the gate itself
    (LigerSwiGLUMLP.forward); otherwise act(gate) and the gate the activation saved (the recompute saves for real).
    The meta trace: fresh seed 131337 draw 26 (Llama-3-8B 8-bit, checkpointed, Liger)."""
    if lin.name != "up_proj" or layer.mlp != "gated":
        return 0
    return lin.out_features * ctx.e * (1 if ctx.liger else 2)


@lru_cache(maxsize=4096)
def end(model: ModelSpec, layer: LayerSpec, train: TrainSpec) -> int | None:
    """Per token, beside the recomputed saved set: a checkpointed layer's backward peaks where its recompute stops
    (torch/utils/checkpoint.py: non-reentrant, early stop in the pack hook of the last saved tensor, lora_B's input
    in the MLP's last linear). Alive then, unsaved: the frames' locals - the decoder layer's `residual` (x + attn;
    parallel attention: the attention output) and the MLP's input (the post-attention norm's output), the last
    linear's input (act(gate) * up) and base output R (bitsandbytes' Linear4bit: R.clone()) and PEFT's copy of its
    input in the adapter dtype (dropout > 0: the dropout's input, not saved) - and the gradients made before the
    first unpack: the residual stream's, and the adapter branch's (peft/tuners/lora/layer.py Linear.forward: (R +
    lora * s).to(R.dtype), whose backward casts the gradient up and back down for R; bnb.py casts the adapter output
    down before the sum instead), whose `* scaling` (MulBackward0 by a number, nothing saved) runs before the
    unpack. The dequantized weight is freed by then. None where this moment is not the one modelled (MoE,
    post-norms, full fine-tuning, a frozen last linear, DoRA: dora.py): the coefficients of coefficients.json stay."""
    if (train.method != "lora" or train.dora or layer.mlp not in ("gated", "plain")
            or model.model_type in ("gemma2", "gemma3_text", "olmo2", "opt")):
        return None
    ctx = saved_set.Ctx.of(train, model)
    sv = saved_set.layer_saved(model, layer, ctx)
    lin, x = sv.marks[-1][0], sv.marks[-1][1]
    if not is_target(lin, train):
        return None
    # parallel attention (GPT-NeoX, Falcon): the decoder holds the attention output, not x + attn, while the MLP
    # runs on its own norm of x (Falcon-7B: the attention's)
    residual = next(f"{m[0].name}.out" for m in sv.marks if m[0].name in dora.RESIDUAL_LINEARS) \
        if layer.parallel_attn else "h1"
    mlp_in = "norm2.out" if "norm2.out" in sv.size else "norm1.out"
    e, lb, h = ctx.e, ctx.lb, model.hidden_size
    out = h * e  # the residual stream's gradient
    if train.quantized and lin.quantizable:  # output.to(R.dtype) before the sum: its gradient cast up, then * s
        out += lin.out_features * lb
    else:
        s = dora.promote(dora.stream_dtype(train), train.lora_dtype)
        out += (lin.out_features * e if s != dora.stream_dtype(train) else 0) + lin.out_features * lb
    for name in dict.fromkeys((residual, mlp_in, x)):
        out += sv.size[name] if name in sv.size and name not in sv.kept else 0
    out += lin.out_features * e  # R
    if ctx.liger:  # Liger's Phi-3 MLP: the gate_up output, a local beside its saved contiguous copies
        out += next((m.out_features * e for m in layer.linears if m.name == "gate_up_proj"), 0)  # (moments.py)
    if ctx.dropout and saved_set.casts(train, e):  # by name: bf16 into fp16 adapters is a copy too
        out += lin.in_features * lb
    return out


@lru_cache(maxsize=4096)
def moe_stop(model: ModelSpec, layer: LayerSpec, train: TrainSpec) -> int:
    """Per token, beside the recomputed saved set: a checkpointed MoE layer's recompute as it runs through transformers
    5's grouped_mm experts (integrations/moe.py 5.24, grouped_mm_experts_forward). At `weighted_out[inv_perm]` the
    function's S = tokens x top-k rows of hidden width are alive: the gathered input selected_hidden_states_g (a
    local: frozen experts' grouped_mm saves only the weight), the down projection's output (saved by the routing-weight
    product: in the saved set), weighted_out, and either its permuted copy (Qwen2-MoE: the shared expert's gate
    product saves after the experts, so the recompute goes on) or, where the experts hold the layer's last saved
    tensor (Qwen3-MoE, Mixtral), the gradient of the experts' output, (T, k, h) from the sum's backward, made before
    the first unpack: the recompute stops in the pack hook of inv_perm, an input of the index, before its output
    exists (torch/utils/checkpoint.py early stop). Three S x h tensors either way, with the sort's int64 index
    tensors (expert ids, permutation, token index), the decoder's `residual` (x + attn) and the post-attention norm's
    output (locals, unless saved) and the residual stream's gradient. 0 but for such layers."""
    if not (train.gradient_checkpointing and layer.num_experts and layer.mlp == "moe") or linear_experts(train):
        return 0
    sv = saved_set.layer_saved(model, layer, saved_set.Ctx.of(train, model))
    e, h, k = saved_set.Ctx.of(train, model).e, model.hidden_size, layer.experts_per_token
    locals_ = sum(sv.size[n] for n in ("h1", "norm2.out") if n in sv.size and n not in sv.kept)
    return h * e + locals_ + 3 * k * h * e + 3 * k * 8
