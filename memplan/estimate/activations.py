"""Activation memory: the tensors autograd saves for backward, layer by layer, for the code path that runs.

Instead of a closed-form "bytes per token" constant (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models", Table 2: 34·s·b·h + 5·a·s²·b for a GPT layer in 16-bit), saved_set.py walks one
decoder layer the way transformers 5 + PEFT + bitsandbytes run it and lists every tensor some backward
function keeps, once per storage (a tensor saved by two consumers counts once). That is what makes the QLoRA
recipe visible: after prepare_model_for_kbit_training the residual stream is fp32, every Linear4bit returns its
output cast back to fp32, and each LoRA dropout keeps its own copy of the layer input.

This module adds the layers up into one configuration's per-token figures (Activations), with the
backward working sets' coefficients (coefficients.json, fitted against the exact meta trace), and
shares them across batches and shapes. All sizes are bytes per token (multiply by b·s).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from operator import attrgetter
from pathlib import Path

from memplan.estimate import dora, moments, offload, recompute
from memplan.estimate.attention import FA2, FUSED, effective_attention, sdpa_gets_a_mask, softcapped  # noqa: F401
from memplan.estimate.attention import softmax_in_dtype
from memplan.estimate.experts import linear_experts, max_quantized_numel
from memplan.estimate.experts import backward_moment as experts_backward
from memplan.estimate.lora import is_target
from memplan.estimate.saved_set import LAYER_NORM_TYPES, Ctx, Saved, casts, layer_saved  # noqa: F401
from memplan.estimate.weights import unquantized_dtype_bytes
from memplan.spec import DTYPES, TRAIN_FIELDS, LayerSpec, ModelSpec, TrainSpec
from memplan.library_facts import INT8_OUTLIER_COLUMNS, LIGER_TYPES


@lru_cache(maxsize=None)
def coefficients() -> dict:
    return json.loads((Path(__file__).parent / "coefficients.json").read_text())


def first_input_frozen(model: ModelSpec, train: TrainSpec) -> bool:
    """True when layer 0's input needs no gradient: LoRA with a frozen input embedding and no checkpointing, and no
    activation offloading (memplan/estimate/offload.py walks its own layers). Checkpointing makes the embedding's
    output require grad (transformers modeling_utils.py 5.24 gradient_checkpointing_enable ->
    enable_input_require_grads); without it nothing does (PEFT's PeftModel only calls it for a model that
    checkpoints). Then layer 0's ops on frozen tensors (its norms, frozen projections, an attention core fed by
    frozen q/k/v) record no autograd node and save nothing; its LoRA branches still save lora_A's input."""
    from memplan.estimate.lora import head_and_embedding_grads

    return (train.method == "lora" and not train.gradient_checkpointing and train.activation_offload == "off"
            and not head_and_embedding_grads(model, train)["embed"])


def _ctx(model: ModelSpec, train: TrainSpec, first: bool) -> Ctx:
    ctx = Ctx.of(train, model)
    return replace(ctx, frozen_input=True) if first else ctx


@lru_cache(maxsize=4096)
def layer_totals(model: ModelSpec, layer: LayerSpec, train: TrainSpec,
                 first: bool = False) -> tuple[int, int, int, int, int]:
    """(saved bytes per token without the layer input, of which attention, the layer input if it is kept,
    and for a gated MLP the product's backward: saved bytes released before it, working set at it)."""
    sv = layer_saved(model, layer, _ctx(model, train, first))
    x = sv.size["x"] if "x" in sv.kept else 0
    freed, work = moments.mlp_product_backward(model, layer, train, sv)
    return sv.total() - x, sv.total("attn") - (x if sv.kept.get("x") == "attn" else 0), x, freed, work


@lru_cache(maxsize=4096)
def _int8_held(model: ModelSpec, layer: LayerSpec, train: TrainSpec, checkpointed: bool,
               offloaded: bool = False, first: bool = False) -> int:
    """Bytes per token of LLM.int8 linear inputs held by their graph nodes beyond what the layer stores anyway:
    under checkpointing all but the layer input; without it, those no op saves. bitsandbytes' MatMul8bitLt keeps
    them as ctx attributes, not through save_for_backward, so saved-tensor hooks never see them: under activation
    offloading (offloaded=True) every one stays on the device, whatever else saves it (the meta trace shows them)."""
    sv = layer_saved(model, layer, _ctx(model, train, first))
    return sum(sv.size[n] for n in sv.int8_inputs if n != "x" and (offloaded or checkpointed or n not in sv.kept)
               ) + int8_outliers(sv)


def int8_outliers(sv: Saved) -> int:
    """Per token: subA, the outlier columns of each LLM.int8 input that needs a gradient, which MatMul8bitLt keeps
    beside it in ctx.tensors (bitsandbytes autograd/_functions.py 0.50: int8_mixed_scaled_mm returns
    A[:, outlier_cols], in A's dtype), library_facts.INT8_OUTLIER_COLUMNS of them."""
    return sum(INT8_OUTLIER_COLUMNS * DTYPES[dt] for lin, x, dt, *_ in sv.marks
               if lin.quantizable and x in sv.int8_inputs)


# ------------------------------------------------------------------------------------------ whole-model view


@dataclass(frozen=True)
class Activations:
    """Per-token byte figures (multiply by tokens) and absolute transients, for one configuration."""

    stored_per_layer: list[int]  # kept per layer: its input under checkpointing, else its saved set; in order
    layer_saved: list[int]  # the layer's own saved set (what recompute rebuilds under checkpointing)
    layer_saved_attn: list[int]
    fixed: int  # embeddings' saved indices, batch ids and labels, rotary cos/sin, final norm state
    final_norm: int  # of which the final norm's saved input and stats: released before the layers' backward
    fwd_transient: int  # live intermediates inside the largest layer's forward (not saved)
    bwd_work_mlp: int  # gradient working set at the start of a layer's backward
    bwd_work_attn: int  # ... at its attention backward
    mlp_mul_freed: list[int]  # per layer: saved bytes released before the gated MLP's product backward
    mlp_mul_work: list[int]  # per layer: working set at that moment (0: no gated MLP)
    dequant_bytes: int  # absolute: bitsandbytes' dequantized copy of the largest linear
    dora_saved: tuple[int, ...] = ()  # absolute, per layer: weights DoRA's F.linear saves (dropout > 0)
    dora_layers: tuple = ()  # per layer: its DoRA linears' terms (dora.DoraLinear), in forward order
    attn_out_saved: tuple = ()  # per layer, per token: what the attention's output linear's adapter saved,
    # released before the attention core's backward (its own backward ran first)
    dequant_work: int = 0  # per token, beside dequant_bytes at the last linear's base backward: set when
    # bwd_work_mlp is the recompute's end (recompute.end), a moment without a dequantized weight
    moe_tail: int = 0  # per token: transformers 5 grouped_mm experts' transient as they combine their outputs
    # activation offloading (memplan/estimate/offload.py): per token
    host_per_layer: tuple = ()  # what each layer's saved set puts in pinned host memory
    reload: int = 0  # brought back to the device during one layer's backward
    reload_first: int = 0  # ... during the first layer's (its saved set differs: offload.device_host)
    reload_attn: int = 0  # ... during one layer's attention backward, less the MLP's device part (released)
    reload_attn_first: int = 0
    recompute_lora_add: list = field(default_factory=list)  # per layer, checkpointed: recompute.lora_add
    bwd_work_h: int = 0  # the residual stream's gradients alive while a layer recomputes (coefficients mlp_h)
    experts_bwd: tuple = ()  # per layer, per token: (released, working set) at trained experts' gate_up backward
    layer_input: int = 0  # per token: a layer's input, the residual stream
    offloaded_layers: bool = False  # --activation-offload all without checkpointing: the saved sets are on the host
    bwd_work_softmax: int = 0  # per token, eager attention: the working set at softmax's backward
    forward_only: int = 0  # per token, of `fixed`: what the forward holds and the backward no longer (eager's mask)
    int8_graph: int = 0  # per token: LLM.int8 inputs held until the graph is freed (moments.int8_graph_held)
    bwd_work_act: int = 0  # per token, a moment of the MLP's backward without a dequantized weight: a plain MLP's
    # activation backward (moments.plain_act_backward), a checkpointed MoE layer's recompute in its experts
    # (recompute.moe_stop); 0 under activation offload all without checkpointing, whose reload terms (offload.py)
    # hold that moment (checkpointed, the recompute runs on the device as without offloading)
    bwd_work_norm: int = 0  # per token: at the layer's input norm's backward, its last op (moments.input_norm_backward)
    fwd_mlp_out: int = 0  # per token: at the last layer's MLP output linear's LoRA add (moments.mlp_out_forward)
    fwd_down: tuple = (0, 0)  # per token, absolute: at the last layer's down_proj forward (moments.down_forward)


def _final_norm(model: ModelSpec, train: TrainSpec, ctx: Ctx) -> int:
    """Per token: what the final norm saves (as _norm: RMSNorm's fp32 input even from 16-bit, rstd, a trained
    weight's normalized input) and, full fine-tuning with the standard loss, lm_head's input for its gradient."""
    h, e = model.hidden_size, ctx.e
    if model.model_type in LAYER_NORM_TYPES:
        out = h * e + 8
    elif ctx.liger:
        out = h * e + 4
    else:
        out = 4 * h + 4 + (h * (4 if ctx.gemma_norm else e) if ctx.method == "full" else 0)
    if ctx.method == "full" and train.loss == "standard":
        out += h * e
    return out


@lru_cache(maxsize=4096)
def _per_layer(model: ModelSpec, train: TrainSpec) -> tuple:
    """Each layer's per-token figures (activations() unpacks them). `train` is activations()' layer key (batch 1, one
    optimizer, the sequence length only where attention is not fused): the shapes of a fit or a sweep share them."""
    ctx = Ctx.of(train, model)
    h, e = model.hidden_size, ctx.e
    stored, saved, saved_attn, mul_freed, mul_work, int8_device, lora_add = [], [], [], [], [], [], []
    experts_bwd = []  # per layer: the trained experts' gate_up backward (experts.backward_moment)
    dora_layers: list = []
    attn_out: list = []
    widest = cast = act_bwd = 0
    ends = []  # per layer: a checkpointed layer's working set at the end of its recompute (recompute.end)
    groups = [(n, layer, False) for n, layer in model.layers]
    if first_input_frozen(model, train):  # layer 0 on its own: its input needs no gradient
        n0, layer0 = model.layers[0]
        groups[:1] = [(1, layer0, True)] + ([(n0 - 1, layer0, False)] if n0 > 1 else [])
    for n, layer, first in groups:
        total, attn, x_kept, freed, work = layer_totals(model, layer, train, first)
        mul_freed += [freed] * n
        mul_work += [work] * n
        experts_bwd += [experts_backward(model, layer, train, e)] * n
        lora_add += [recompute.lora_add(model, layer, train)] * n
        saved += [total] * n
        saved_attn += [attn] * n
        dora_layers += [_dora_layer(model, layer, train, first)] * n
        attn_out += [_attn_out_saved(model, layer, train, first)] * n
        int8 = _int8_held(model, layer, train, train.gradient_checkpointing, first=first) if train.bits == 8 else 0
        stored += [(h * e if train.gradient_checkpointing else total + x_kept) + int8] * n
        # offloaded, checkpointed: LLM.int8 inputs, held outside the hooks, stay on the device (else offload.int8_held)
        int8_device += [_int8_held(model, layer, train, True, True)
                        if train.bits == 8 and train.gradient_checkpointing else 0] * n
        i = max((lin.out_features for lin in layer.linears), default=h)
        moe_slots = layer.experts_per_token  # 5.x grouped_mm: every token-slot's gate_up output at once;
        if linear_experts(train) and layer.num_experts:  # 4.x loop: one expert's share of the slots at a time
            moe_slots /= layer.num_experts
        i = max(i, int(layer.expert_intermediate * 2 * moe_slots))
        act_bwd = max(act_bwd, moments.plain_act_backward(model, layer, train), recompute.moe_stop(model, layer, train))
        widest = max(widest, i)
        if train.gradient_checkpointing:
            ends.append(recompute.end(model, layer, train))
        if train.method == "lora" and casts(train, e):  # PEFT casts an adapted linear's input to the adapter dtype:
            cast = max([cast] + [lin.in_features * ctx.lb for lin in layer.linears if is_target(lin, train)])
    return (tuple(stored), tuple(saved), tuple(saved_attn), tuple(mul_freed), tuple(mul_work), tuple(int8_device),
            tuple(lora_add), tuple(dora_layers), tuple(attn_out), widest, cast, tuple(ends), act_bwd,
            tuple(experts_bwd) if any(map(any, experts_bwd)) else ())


_LAYER_KEYS: dict = {}  # (_LAYER_FIELDS, seq_len) -> train at batch 1, AdamW, that length: one object per key
_LAYER_FIELDS = attrgetter(*(f for f in TRAIN_FIELDS if f not in ("seq_len", "batch_size", "optimizer")))


def _layer_key(train: TrainSpec, seq_len: int) -> TrainSpec:
    """train at batch 1, AdamW and seq_len, one object per distinct key: the caches keyed on it then match it by
    identity, not field by field (batch and optimizer do not change per-token activation figures)."""
    fields = (_LAYER_FIELDS(train), seq_len)
    key = _LAYER_KEYS.get(fields)
    if key is None:
        if len(_LAYER_KEYS) > 65536:
            _LAYER_KEYS.clear()
        key = _LAYER_KEYS[fields] = train.variant(batch_size=1, optimizer="adamw", seq_len=seq_len)
    return key


def per_seq(model: ModelSpec, train: TrainSpec) -> bool:
    """Whether activations() depends on the sequence length beyond the tokens its per-token figures multiply (it
    depends on the batch through rotary cos / sin, shared by it): eager scores and masks are s wide, an SDPA mask
    appears at a window, offloading compares each tensor's size with TRL's minimum."""
    attention = effective_attention(model, train)
    return (attention not in FUSED or train.activation_offload == "all" and not train.gradient_checkpointing
            or attention == "sdpa" and sdpa_gets_a_mask(model, 1 << 62, train.transformers))  # at any length


def activations(model: ModelSpec, train: TrainSpec) -> Activations:
    """The per-token activation figures of this configuration (_activations). They depend on the batch only
    through rotary cos / sin, (1, s, head_dim) shared by the batch, so they are computed once at batch 1 and
    shared by every batch; offloading every saved tensor decides per tensor size (TRL's minimum), per batch."""
    if train.activation_offload == "all" and not train.gradient_checkpointing:
        return _activations(model, train)
    a = _at_batch_one(model, _layer_key(train, train.seq_len))
    if train.batch_size == 1:
        return a
    out = object.__new__(Activations)  # a copy but for `fixed` (dataclasses.replace re-runs __init__: slower)
    out.__dict__.update(a.__dict__)
    rotary = 2 * model.head_dim * unquantized_dtype_bytes(train)
    out.__dict__["fixed"] = a.fixed - rotary + rotary // train.batch_size
    return out


@lru_cache(maxsize=4096)
def _at_batch_one(model: ModelSpec, train: TrainSpec) -> Activations:
    return _activations(model, train)


def _activations(model: ModelSpec, train: TrainSpec) -> Activations:
    if train.liger and model.model_type not in LIGER_TYPES:
        from memplan.errors import MemplanError

        raise MemplanError(f"--liger on: liger-kernel has no RMSNorm/SwiGLU kernels for {model.model_type} "
                           f"(it patches {', '.join(LIGER_TYPES)})")
    ctx = Ctx.of(train, model)
    k = coefficients()["backward"]
    h, e = model.hidden_size, ctx.e
    # per-token layer figures do not depend on batch, optimizer or (for fused attention) sequence length
    masked = ctx.attention == "sdpa" and sdpa_gets_a_mask(model, train.seq_len, train.transformers)
    per_seq = ctx.attention not in FUSED or masked
    layer_key = _layer_key(train, train.seq_len if per_seq else 1)
    (stored, saved, saved_attn, mul_freed, mul_work, int8_device, lora_add, dora_layers, attn_out, widest, cast,
     ends, act_bwd, experts_bwd) = _per_layer(model, layer_key)
    # rotary cos / sin are (1, s, head_dim): per sequence position, shared by the batch
    final_norm = _final_norm(model, train, ctx)
    fixed = 8 * 3 + 2 * model.head_dim * e // train.batch_size + final_norm
    forward_only = 0
    if ctx.attention in ("eager", "math"):  # the 4-D causal mask (b, 1, s, s) in the activation dtype; Gemma-2
        mask = (2 if model.model_type == "gemma2" else 1) * train.seq_len * e  # builds a second, sliding
        fixed += mask
        # only the model's forward holds it (`scores + mask` saves neither): it dies with the forward unless the
        # checkpointed layers' recompute closures keep it (GradientCheckpointingLayer passes it in their kwargs)
        forward_only = 0 if train.gradient_checkpointing else mask
    elif masked:  # the (b, 1, s, s) boolean mask (masking_utils), alive for the whole step
        fixed += train.seq_len
    # eager: the scaled (and masked) scores beside softmax's fp32 output, then that output beside its cast to the
    # activations' dtype; fp32 activations make the cast a no-op, so two fp32 score tensors at most
    eager = model.num_heads * train.seq_len * (2 * e + 4 if e != 4 else 8) if ctx.attention not in FUSED else 0
    if ctx.attention == "eager" and softmax_in_dtype(model):
        eager = moments.falcon_eager_forward(model, train, e)
    fwd_transient = widest * (e + ctx.c) + h * ctx.c + eager
    if ctx.attention == "eager" and not softmax_in_dtype(model) and train.activation_offload == "off":
        # the scores and the MLP's transients are not alive together: at the MLP the last layer's attention has
        # saved its probabilities (and the rest of its set; checkpointed, nothing); at the softmax only the scores
        # are new
        saved_before = 0 if train.gradient_checkpointing else saved_attn[-1]
        fwd_transient = max(widest * (e + ctx.c) + h * ctx.c + saved_before, eager)
    promoted = moments.lora_sum_promoted(model, train)
    fwd_transient += promoted
    bwd_mlp = int(k["mlp_h"] * h * e + k["mlp_i"] * widest * e) + cast  # a copy alive beside the recompute
    dequant_work = 0
    if ends and None not in ends:  # what the recompute's frames and the first gradients hold, term by term
        bwd_mlp = max(ends)
        # later, the last linear's base backward dequantizes its weight: the residual gradient and the input
        # gradient it makes (MatMul4Bit / MatMul8bitLt backward) beside it; the frames are gone
        dequant_work = max(h * e + layer.linears[-1].in_features * e for _, layer in model.layers)
    else:
        bwd_mlp += promoted if train.gradient_checkpointing else 0  # the recompute adds again
    # eager: the softmax's backward is a moment of its own, before q/k/v's backward and its dequantized weight: the
    # residual stream's gradient, v's gradient (from probs @ v's backward, which released the v it saved: as large)
    # and the softmax terms; offloaded, what TRL's bwd stash still holds (offload.eager_softmax_backward_held)
    softmax = (h * e + moments.eager_softmax_backward(model, train, e)
               + offload.eager_softmax_backward_held(model, train, e)) if ctx.attention == "eager" else 0
    eager_bwd = moments.math_softmax_backward(model, train) if ctx.attention == "math" else 0
    bwd_attn = int(k["attn_h"] * h * e + k["attn_qkv"] * (model.num_heads + 2 * model.num_kv_heads) * model.head_dim * e
                   + eager_bwd)
    # LLM.int8's backward dequantizes CB to its input's dtype (bitsandbytes autograd/_functions.py MatMul8bitLt)
    dequant = max_quantized_numel(model, train) * (ctx.e if train.bits == 8 else ctx.c) if train.quantized else 0
    tail = moments.moe_tail(model, model.layers[-1][1], layer_key)
    host, reload = (), (0, 0, 0, 0)
    offloaded = train.activation_offload == "all" and not train.gradient_checkpointing
    if train.activation_offload != "off":
        stored, host, reload = offload.device_host(model, train, layer_key, stored, h * e)
        stored = [d + i for d, i in zip(stored, int8_device)]
    dora_saved = tuple(sum(d.weight for d in layer) for layer in dora_layers) if train.dora else ()
    return Activations(stored, saved, saved_attn, fixed, final_norm, fwd_transient, bwd_mlp, bwd_attn, mul_freed,
                       mul_work, dequant, dora_saved if any(dora_saved) else (), tuple(dora_layers),
                       dequant_work=dequant_work, attn_out_saved=tuple(attn_out), moe_tail=tail,
                       host_per_layer=host, reload=reload[0], reload_first=reload[1], reload_attn=reload[2],
                       reload_attn_first=reload[3],
                       recompute_lora_add=lora_add if train.gradient_checkpointing else [],
                       bwd_work_h=int(k["mlp_h"] * h * e), experts_bwd=experts_bwd, layer_input=h * e,
                       offloaded_layers=offloaded,
                       bwd_work_softmax=softmax, forward_only=forward_only,
                       int8_graph=moments.int8_graph_held(model, layer_key),
                       bwd_work_act=0 if offloaded else act_bwd,
                       bwd_work_norm=moments.input_norm_backward(model, layer_key),
                       fwd_mlp_out=moments.mlp_out_forward(model, layer_key),
                       fwd_down=moments.down_forward(model, layer_key))


@lru_cache(maxsize=4096)
def _attn_out_saved(model: ModelSpec, layer: LayerSpec, train: TrainSpec, first: bool = False) -> int:
    """Per token: the saved tensors of the attention output linear's adapter (dropout copy, mask, lora_A's output,
    DoRA's products' inputs), released by its backward, which runs before the attention core's."""
    if train.method != "lora":
        return 0
    sv = layer_saved(model, layer, _ctx(model, train, first))
    out = next((m[0].name for m in sv.marks if m[0].name in dora.RESIDUAL_LINEARS), None)
    return sum(sv.size[n] for n, g in sv.kept.items() if g == "attn" and out and n.startswith(out + "."))


@lru_cache(maxsize=4096)
def _dora_layer(model: ModelSpec, layer: LayerSpec, train: TrainSpec, first: bool = False) -> tuple:
    """The DoRA terms of one layer's adapted linears (dora.layer_linears), from its saved-set walk."""
    if train.method != "lora" or not train.dora:
        return ()
    sv = layer_saved(model, layer, _ctx(model, train, first))
    stash = offload.dora_norm_stash(sv, train) if train.activation_offload == "all" else ()
    return dora.layer_linears(model, train, sv.marks, set(sv.kept), sv.size, sv.total(), sv.nograd, stash)
