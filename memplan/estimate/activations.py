"""Activation memory: the tensors autograd saves for backward, layer by layer, for the code path that runs.

Instead of a closed-form "bytes per token" constant (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models", Table 2: 34·s·b·h + 5·a·s²·b for a GPT layer in 16-bit), this module walks one
decoder layer the way transformers 5 + PEFT + bitsandbytes run it and lists every tensor some backward
function keeps, once per storage (a tensor saved by two consumers counts once). That is what makes the QLoRA
recipe visible: after prepare_model_for_kbit_training the residual stream is fp32, every Linear4bit returns its
output cast back to fp32, and each LoRA dropout keeps its own copy of the layer input.

Rules, from the source of each op's backward (torch/csrc/autograd/FunctionsManual.cpp, derivatives.yaml):
- a frozen linear (bitsandbytes MatMul4Bit/MatMul8bitLt, or a 16-bit nn.Linear without grad) saves no input;
  a trainable one (full fine-tuning) saves its input;
- a PEFT LoRA branch (peft/tuners/lora/layer.py, bnb.py) casts x to the adapter dtype (a copy if it differs),
  applies its own nn.Dropout (p > 0: a new output + a bool mask, both per adapted linear), saves the dropout
  output (lora_A's input) and lora_A's r-wide output (lora_B's input);
- RMSNorm (LlamaRMSNorm) upcasts to fp32 (a copy when the input is 16-bit) and saves that and rsqrt (T x 1);
  LayerNorm saves its input plus fp32 mean and rstd per token;
- SiLU/GELU save their input, ReLU its output, a product x*y both factors, rotary embedding cos/sin only;
- SDPA's fused kernels (flash / memory-efficient) save q, k, v, the output and a fp32 logsumexp per head and
  token: O(s), and GQA runs natively on the kv heads when there is no mask (integrations/sdpa_attention.py,
  use_gqa_in_sdpa). Eager attention repeats k/v to all heads and saves the fp32 softmax (b·a·s² · 4 B) and, in
  16-bit, its cast back.
- MoE (transformers 5 eager experts loop): per routed token-slot the expert's gate_up output, act output and
  down output (weighted by the router) are saved; routing is taken balanced (tokens·top_k slots in all).

All sizes below are bytes per token (multiply by b·s); eager scores are per token too (a·s elements each).
Backward working sets use the few coefficients in coefficients.json, fitted against the exact meta trace.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from memplan.estimate.experts import expert_mlp, linear_experts, max_quantized_numel
from memplan.estimate.experts import router as experts_router
from memplan.estimate.lora import is_target
from memplan.estimate.weights import unquantized_dtype_bytes
from memplan.spec import DTYPES, LayerSpec, Linear, ModelSpec, TrainSpec


@lru_cache(maxsize=None)
def coefficients() -> dict:
    return json.loads((Path(__file__).parent / "coefficients.json").read_text())


@dataclass(frozen=True)
class Ctx:
    """Element sizes and switches for one configuration."""

    e: int  # residual stream / activation element bytes (fp32 after prepare_model_for_kbit_training)
    c: int  # compute dtype bytes (what bitsandbytes dequantizes to and multiplies in)
    lb: int  # LoRA adapter dtype bytes
    r: int
    dropout: bool
    method: str
    train: TrainSpec
    s: int  # sequence length (eager scores are s wide)
    attention: str  # the attention that runs (see effective_attention)

    @staticmethod
    def of(train: TrainSpec, model: ModelSpec | None = None) -> "Ctx":
        return Ctx(e=unquantized_dtype_bytes(train), c=DTYPES[train.compute_dtype], lb=DTYPES[train.lora_dtype],
                   r=train.lora_r, dropout=train.lora_dropout > 0, method=train.method, train=train, s=train.seq_len,
                   attention=effective_attention(model, train) if model else train.attention)


def softcapped(model: ModelSpec) -> bool:
    """Gemma-2 caps attention logits (attn_logit_softcapping, default 50.0): tanh(scores / cap) * cap."""
    return model.model_type == "gemma2" and bool(model.hf_config.get("attn_logit_softcapping", 50.0))


# Model types that transformers 4.57.6 still masks with their own _update_causal_mask, which returns no mask for
# SDPA in training without an attention_mask (AttentionMaskConverter._ignore_causal_mask_sdpa).
_TF4_OWN_MASK = ("falcon", "opt", "qwen2_moe")


def sdpa_gets_a_mask(model: ModelSpec, seq_len: int, transformers: int = 5) -> bool:
    """SDPA runs causal without a mask unless the model passes one: Falcon always does
    (allow_is_causal_skip=False); sliding-window models (Mistral v0.1, Phi-3 mini-4k; Qwen with
    use_sliding_window) do once the sequence is longer than the window (transformers masking_utils).
    transformers 4.57.6: the batch carries no attention_mask, so masking_utils._preprocess_mask_arguments runs
    find_packed_sequence_indices on the position ids, which in 4.x always returns a tensor (5.x returns None when
    nothing is packed); create_causal_mask then sets allow_is_causal_skip=False and every layer gets a
    (b, 1, s, s) boolean mask: CUDA runs the memory-efficient kernel, and GQA goes through repeat_kv
    (sdpa_attention.use_gqa_in_sdpa needs attention_mask None)."""
    if transformers == 4:
        return model.model_type not in _TF4_OWN_MASK
    cfg = model.hf_config
    if model.model_type == "falcon":
        return True
    window = cfg.get("sliding_window")
    if model.model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window"):
        return False
    return bool(window) and seq_len >= window  # masking_utils: kv_length >= local_attention_size


def effective_attention(model: ModelSpec, train: TrainSpec) -> str:
    """The attention that runs. transformers implements Gemma-2's soft-capping only in its eager attention.
    Falcon-7B's multi-query SDPA call passes one k/v head without enable_gqa, which torch 2.13's flash,
    memory-efficient and cuDNN kernels all reject (sdp_utils check_batch_size_and_num_heads_dense): CUDA runs
    the math kernel, which upcasts q, k, v to fp32 and keeps the fp32 softmax (b·a·s²·4 B)."""
    if softcapped(model):
        return "eager"
    cfg = model.hf_config
    if (train.attention == "sdpa" and model.model_type == "falcon" and cfg.get("multi_query", True)
            and not cfg.get("new_decoder_architecture")):
        return "math"
    return train.attention


class Saved:
    """Tensors kept for backward, by name, each counted once. `tensor()` declares a tensor (and its size);
    `keep()` marks it saved; `new()` declares and keeps."""

    def __init__(self):
        self.size: dict[str, int] = {}
        self.kept: dict[str, str] = {}  # name -> group ("attn" | "mlp")

    def tensor(self, name: str, nbytes: int) -> str:
        self.size[name] = nbytes
        return name

    def keep(self, name: str, group: str) -> None:
        self.kept.setdefault(name, group)

    def new(self, name: str, nbytes: int, group: str) -> str:
        self.tensor(name, nbytes)
        self.keep(name, group)
        return name

    def total(self, group: str | None = None) -> int:
        return sum(self.size[n] for n, g in self.kept.items() if group is None or g == group)


def _linear(sv: Saved, ctx: Ctx, lin: Linear, x: str, in_bytes: int, group: str) -> str:
    """Run one (possibly LoRA-adapted) linear on tensor x; returns its output's name."""
    if ctx.method == "full":
        sv.keep(x, group)
    elif is_target(lin, ctx.train):
        if ctx.dropout:
            sv.new(f"{lin.name}.drop", lin.in_features * ctx.lb, group)
            sv.new(f"{lin.name}.mask", lin.in_features, group)
        elif ctx.lb != in_bytes:
            sv.new(f"{lin.name}.cast", lin.in_features * ctx.lb, group)
        else:
            sv.keep(x, group)
        sv.new(f"{lin.name}.A", ctx.r * ctx.lb, group)
        if ctx.train.dora:  # DoRA keeps the adapted output to rescale by the magnitude
            sv.new(f"{lin.name}.dora", lin.out_features * ctx.lb, group)
    return sv.tensor(f"{lin.name}.out", lin.out_features * ctx.e)


def _norm(sv: Saved, ctx: Ctx, x: str, h: int, kind: str, group: str, name: str) -> str:
    if kind == "layer":  # LayerNorm saves input, fp32 mean and rstd
        sv.keep(x, group)
        sv.new(f"{name}.stats", 8, group)
    else:  # RMSNorm: fp32 view of the input (a copy if 16-bit) and rsqrt
        if ctx.e == 4:
            sv.keep(x, group)
        else:
            sv.new(f"{name}.x32", 4 * h, group)
        sv.new(f"{name}.rstd", 4, group)
    return sv.tensor(f"{name}.out", h * ctx.e)


def _attention(sv: Saved, ctx: Ctx, model: ModelSpec, layer: LayerSpec, x_norm: str) -> None:
    a, kv, d, h, e = model.num_heads, model.num_kv_heads, model.head_dim, model.hidden_size, ctx.e
    lins = {lin.name: lin for lin in layer.linears}
    fused = lins.get("qkv_proj") or lins.get("query_key_value")
    if fused:  # q, k, v are views of one output
        out = _linear(sv, ctx, fused, x_norm, e, "attn")
        q = k = v = out
        if model.model_type == "falcon" and model.hf_config.get("new_decoder_architecture"):
            # FalconAttention._split_heads copies k and v out of the fused output (fused_qkv[..., [-2], :]) and
            # broadcasts them to every query head; the reshape for attention materializes a·d each
            kv = a
            v = sv.tensor("v.bcast", a * d * e)
    else:
        q = _linear(sv, ctx, lins["q_proj"], x_norm, e, "attn")
        k = _linear(sv, ctx, lins["k_proj"], x_norm, e, "attn")
        v = _linear(sv, ctx, lins["v_proj"], x_norm, e, "attn")
    if layer.qk_norm:  # Qwen3 q_norm / k_norm: RMSNorm over head_dim
        q = _norm(sv, ctx, q, a * d, "rms", "attn", "q_norm")
        k = _norm(sv, ctx, k, kv * d, "rms", "attn", "k_norm")
        sv.size["q_norm.rstd"], sv.size["k_norm.rstd"] = 4 * a, 4 * kv
    if model.model_type != "opt":  # rotary: q*cos + rotate_half(q)*sin makes new q and k
        q = sv.tensor("q.rot", a * d * e)
        k = sv.tensor("k.rot", kv * d * e)
    if ctx.attention == "sdpa":
        masked = sdpa_gets_a_mask(model, ctx.s, ctx.train.transformers)
        if masked and kv != a:  # with a mask transformers does not use SDPA's native GQA: repeat_kv copies
            k = sv.tensor("k.rep", a * d * e)
            v = sv.tensor("v.rep", a * d * e)
        for t in (q, k, v):
            sv.keep(t, "attn")
        sv.new("attn.out", a * d * e, "attn")
        sv.new("attn.lse", a * 4, "attn")
        if masked:  # the memory-efficient kernel gets the mask as an additive (b, 1, s, s padded to 16) tensor
            sv.new("attn.mask", -(-ctx.s // 16) * 16 * e, "attn")  # in the query dtype, kept for backward
    elif ctx.attention == "math":  # fp32 copies of q, k, v and the fp32 softmax
        sv.new("math.qkv", (a + 2 * kv) * d * 4, "attn")
        sv.new("probs.fp32", a * ctx.s * 4, "attn")
    else:
        if kv != a:  # repeat_kv copies k and v to every head
            sv.new("k.rep", a * d * e, "attn")
            sv.new("v.rep", a * d * e, "attn")
        else:
            sv.keep(k, "attn")
            sv.keep(v, "attn")
        sv.keep(q, "attn")
        if softcapped(model):  # tanh(scores / cap) saves its output
            sv.new("scores.tanh", a * ctx.s * e, "attn")
        sv.new("probs.fp32", a * ctx.s * 4, "attn")  # softmax(dtype=float32) saves its result
        if e != 4:
            sv.new("probs", a * ctx.s * e, "attn")  # .to(q.dtype), saved by probs @ v
    # o_proj's input: transpose(1, 2).contiguous(). The fused kernels already write their output in the
    # (b, s, heads, d) layout, so the copy is a no-op there; eager's matmul output needs a real copy.
    ctx_t = "attn.out" if ctx.attention == "sdpa" else sv.tensor("attn.ctx", a * d * e)
    o = lins.get("o_proj") or lins.get("out_proj") or lins.get("dense")
    _linear(sv, ctx, o, ctx_t, e, "attn")
    if _opt_dropout(model):  # OPT's residual dropout keeps a bool mask
        sv.new("attn.resid_mask", h, "attn")


def _opt_dropout(model: ModelSpec) -> bool:
    """OPT drops out the attention and MLP outputs in training (OPTConfig.dropout, default 0.1)."""
    return model.model_type == "opt" and bool(model.hf_config.get("dropout", 0.1))


def _dense_mlp(sv: Saved, ctx: Ctx, layer: LayerSpec, x_norm: str, hidden_act: str, group="mlp") -> str:
    lins = {lin.name: lin for lin in layer.linears}
    e = ctx.e
    if layer.mlp == "plain":
        up = lins.get("dense_h_to_4h") or lins.get("fc1")
        down = lins.get("dense_4h_to_h") or lins.get("fc2")
        f = _linear(sv, ctx, up, x_norm, e, group)
        if hidden_act == "relu":  # ReLU saves its output
            act = sv.new("mlp.act", up.out_features * e, group)
        else:
            sv.keep(f, group)
            act = sv.tensor("mlp.act", up.out_features * e)
        return _linear(sv, ctx, down, act, e, group)
    fused = lins.get("gate_up_proj")
    if fused:  # Phi-3: gate and up are views of one output; act saves the view (the whole storage)
        gu = _linear(sv, ctx, fused, x_norm, e, group)
        i = fused.out_features // 2
        sv.keep(gu, group)
    else:
        gate, up = lins["gate_proj"], lins["up_proj"]
        i = gate.out_features
        g = _linear(sv, ctx, gate, x_norm, e, group)
        u = _linear(sv, ctx, up, x_norm, e, group)
        sv.keep(g, group)
        sv.keep(u, group)
    sv.new("mlp.act", i * e, group)  # act(gate), saved by the product
    m = sv.tensor("mlp.prod", i * e)
    return _linear(sv, ctx, lins["down_proj"], m, e, group)


def _moe(sv: Saved, ctx: Ctx, model: ModelSpec, layer: LayerSpec, x_norm: str) -> None:
    e, k, mi, E = ctx.e, layer.experts_per_token, layer.expert_intermediate, layer.num_experts
    h = model.hidden_size
    if linear_experts(ctx.train):  # transformers 4: the router is a (LoRA-adaptable) nn.Linear
        _linear(sv, ctx, experts_router(model, layer), x_norm, e, "mlp")
    sv.new("router.probs", E * 4 + k * (8 + 4), "mlp")  # fp32 softmax, top-k indices and weights
    if linear_experts(ctx.train):
        # transformers 4.57.6 MixtralSparseMoeBlock.forward: a loop over the experts hit; per token-slot the
        # gathered input (hidden_states[None, top_x]) runs act(gate(x)) * up(x) -> down, each an nn.Linear that
        # LoRA may adapt, then the output is scaled by its routing weight (mul saves both) and index_add_-ed
        slot = Saved()
        xs = slot.tensor("x", h * e)
        gate, up, down = expert_mlp(model, layer)
        g = _linear(slot, ctx, gate, xs, e, "mlp")
        u = _linear(slot, ctx, up, xs, e, "mlp")
        slot.keep(g, "mlp")
        slot.keep(u, "mlp")
        slot.new("act", mi * e, "mlp")
        _linear(slot, ctx, down, slot.tensor("prod", mi * e), e, "mlp")
        slot.new("out", h * e + 8 + 8 + e, "mlp")  # down's output, top_x / idx (int64), the routing weight
        # index_add_'s backward formula expands the gradient to `source` (derivatives.yaml), so autograd keeps
        # the scaled output too
        slot.new("scaled", h * e, "mlp")
        sv.new("experts", k * slot.total(), "mlp")
    else:
        # per token-slot: gate_up output (act saves the gate view), act output, the expert output scaled by its
        # routing weight (mul saves it), token / slot indices (int64) and the gathered routing weight
        sv.new("experts", k * (2 * mi * e + mi * e + h * e + 8 + 8 + e), "mlp")
    lins = {lin.name: lin for lin in layer.linears}
    if "shared_expert_gate" in lins:  # Qwen2-MoE: a dense shared expert scaled by sigmoid(shared_expert_gate(x))
        out = _dense_mlp(sv, ctx, layer, x_norm, "silu")
        _linear(sv, ctx, lins["shared_expert_gate"], x_norm, e, "mlp")
        sv.keep(out, "mlp")  # the product with the sigmoid saves both factors
        sv.new("shared.sig", e, "mlp")


def layer_saved(model: ModelSpec, layer: LayerSpec, ctx: Ctx) -> Saved:
    """Everything one decoder layer keeps for backward, per token. Its input "x" (the previous layer's output)
    is kept only if an op here saves it: an fp32 RMSNorm or a LayerNorm does, a 16-bit RMSNorm saves its own
    fp32 copy instead."""
    sv = Saved()
    h = model.hidden_size
    norm_kind = "layer" if model.model_type in ("falcon", "gpt_neox", "opt") else "rms"
    x = sv.tensor("x", h * ctx.e)
    n1 = _norm(sv, ctx, x, h, norm_kind, "attn", "norm1")
    _attention(sv, ctx, model, layer, n1)
    if layer.parallel_attn:  # Falcon-7B: one norm feeds both; GPT-NeoX / Falcon-40B: a second norm of x
        n_ln = 2 if model.model_type == "gpt_neox" or model.hf_config.get("new_decoder_architecture") else 1
        n2 = _norm(sv, ctx, x, h, norm_kind, "mlp", "norm2") if n_ln == 2 else n1
    else:
        h1 = sv.tensor("h1", h * ctx.e)  # x + attention output
        n2 = _norm(sv, ctx, h1, h, norm_kind, "mlp", "norm2")
    if layer.mlp == "moe":
        _moe(sv, ctx, model, layer, n2)
    else:
        _dense_mlp(sv, ctx, layer, n2, model.hf_config.get("hidden_act") or model.hf_config.get("activation_function")
                   or "silu")
    if _opt_dropout(model):
        sv.new("mlp.resid_mask", h, "mlp")
    if model.model_type == "gemma2":  # post-attention / post-feedforward RMSNorms on the o_proj and down_proj
        sv.new("norm.post", 2 * (4 * h + 4), "mlp")  # outputs: each keeps an fp32 input (or copy) and rsqrt
    return sv


@lru_cache(maxsize=4096)
def _layer_totals(model: ModelSpec, layer: LayerSpec, train: TrainSpec) -> tuple[int, int, int]:
    """(saved bytes per token without the layer input, of which attention, the layer input if it is kept)."""
    sv = layer_saved(model, layer, Ctx.of(train, model))
    x = sv.size["x"] if "x" in sv.kept else 0
    return sv.total() - x, sv.total("attn") - (x if sv.kept.get("x") == "attn" else 0), x


# ------------------------------------------------------------------------------------------ whole-model view


@dataclass(frozen=True)
class Activations:
    """Per-token byte figures (multiply by tokens) and absolute transients, for one configuration."""

    stored_per_layer: list[int]  # kept per layer: its input under checkpointing, else its saved set; in order
    layer_saved: list[int]  # the layer's own saved set (what recompute rebuilds under checkpointing)
    layer_saved_attn: list[int]
    fixed: int  # embeddings' saved indices, batch ids and labels, rotary cos/sin, final norm state
    fwd_transient: int  # live intermediates inside the largest layer's forward (not saved)
    bwd_work_mlp: int  # gradient working set at the start of a layer's backward
    bwd_work_attn: int  # ... at its attention backward
    dequant_bytes: int  # absolute: bitsandbytes' dequantized copy of the largest linear


def activations(model: ModelSpec, train: TrainSpec) -> Activations:
    ctx = Ctx.of(train, model)
    k = coefficients()["backward"]
    h, e = model.hidden_size, ctx.e
    stored, saved, saved_attn = [], [], []
    # per-token layer figures do not depend on batch, optimizer or (for fused attention) sequence length
    masked = ctx.attention == "sdpa" and sdpa_gets_a_mask(model, train.seq_len, train.transformers)
    per_seq = ctx.attention != "sdpa" or masked
    layer_key = train.with_(batch_size=1, optimizer="adamw", seq_len=train.seq_len if per_seq else 1)
    widest = cast = 0
    for n, layer in model.layers:
        total, attn, x_kept = _layer_totals(model, layer, layer_key)
        saved += [total] * n
        saved_attn += [attn] * n
        stored += [h * e if train.gradient_checkpointing else total + x_kept] * n
        i = max((lin.out_features for lin in layer.linears), default=h)
        moe_slots = layer.experts_per_token  # 5.x grouped_mm: every token-slot's gate_up output at once;
        if linear_experts(train) and layer.num_experts:  # 4.x loop: one expert's share of the slots at a time
            moe_slots /= layer.num_experts
        i = max(i, int(layer.expert_intermediate * 2 * moe_slots))
        widest = max(widest, i)
        if train.method == "lora" and ctx.lb != e:  # PEFT casts an adapted linear's input to the adapter dtype:
            cast = max([cast] + [lin.in_features * ctx.lb for lin in layer.linears if is_target(lin, train)])
    fixed = 8 * 3 + 2 * model.head_dim * e + h * e + (8 if model.model_type in ("falcon", "gpt_neox", "opt") else 4)
    if ctx.attention in ("eager", "math"):  # the 4-D causal mask (b, 1, s, s) in the activation dtype; Gemma-2
        fixed += (2 if model.model_type == "gemma2" else 1) * train.seq_len * e  # builds a second, sliding
    elif masked and train.transformers == 4:  # the (b, 1, s, s) boolean mask, alive for the whole step
        fixed += train.seq_len
    eager = model.num_heads * train.seq_len * (2 * e + 4) if ctx.attention != "sdpa" else 0
    fwd_transient = widest * (e + ctx.c) + h * ctx.c + eager
    bwd_mlp = int(k["mlp_h"] * h * e + k["mlp_i"] * widest * e) + cast  # a copy alive beside the recompute
    bwd_attn = int(k["attn_h"] * h * e + k["attn_qkv"] * (model.num_heads + 2 * model.num_kv_heads) * model.head_dim * e
                   + (model.num_heads * train.seq_len * (e + 4 + 4) if ctx.attention != "sdpa" else 0))
    dequant = max_quantized_numel(model, train) * ctx.c if train.quantized else 0
    return Activations(stored, saved, saved_attn, fixed, fwd_transient, bwd_mlp, bwd_attn, dequant)
