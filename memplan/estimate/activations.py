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
from dataclasses import dataclass, field, replace
from functools import lru_cache
from operator import attrgetter
from pathlib import Path

from memplan.estimate import dora, moments, offload, recompute
from memplan.estimate.attention import FA2, FUSED, effective_attention, sdpa_gets_a_mask, softcapped  # noqa: F401
from memplan.estimate.attention import softmax_in_dtype
from memplan.estimate.experts import expert_mlp, linear_experts, max_quantized_numel
from memplan.estimate.experts import router as experts_router
from memplan.estimate.experts import backward_moment as experts_backward
from memplan.estimate.lora import is_target
from memplan.estimate.weights import unquantized_dtype_bytes
from memplan.spec import DTYPES, TRAIN_FIELDS, LayerSpec, Linear, ModelSpec, TrainSpec
from memplan.library_facts import INT8_OUTLIER_COLUMNS, LIGER_TYPES

LAYER_NORM_TYPES = ("falcon", "gpt_neox", "opt")  # nn.LayerNorm in every layer; the others' are RMSNorms


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
    liger: bool = False  # Liger's RMSNorm / SwiGLU (memplan/trace/liger.py has their saved tensors)
    gemma_norm: bool = False  # Gemma's RMSNorm multiplies in fp32 by (1 + weight)
    frozen_input: bool = False  # the layer's input needs no gradient (first_input_frozen): layer 0 without
    # checkpointing, where ops on frozen tensors build no graph node and save nothing

    @staticmethod
    def of(train: TrainSpec, model: ModelSpec | None = None) -> "Ctx":
        return Ctx(e=unquantized_dtype_bytes(train), c=DTYPES[train.compute_dtype], lb=DTYPES[train.lora_dtype],
                   r=train.lora_r, dropout=train.lora_dropout > 0, method=train.method, train=train, s=train.seq_len,
                   attention=effective_attention(model, train) if model else train.attention, liger=train.liger,
                   gemma_norm=bool(model) and model.model_type.startswith("gemma"))

    def dtype_of(self, nbytes: int) -> str:
        """The dtype name of a tensor of `nbytes` per element: the stream's, or else the compute dtype."""
        return dora.stream_dtype(self.train) if nbytes == self.e else self.train.compute_dtype


class Saved:
    """Tensors kept for backward, by name, each counted once. `tensor()` declares a tensor (and its size);
    `keep()` marks it saved; `new()` declares and keeps."""

    def __init__(self):
        self.size: dict[str, int] = {}
        self.kept: dict[str, str] = {}  # name -> group ("attn" | "mlp")
        self.shared: set[str] = set()  # saved by more than one op (activation offloading keeps these on the device)
        self.int8_inputs: set[str] = set()  # inputs of LLM.int8 linears (MatMul8bitLt keeps them outside autograd)
        # every linear in forward order, for DoRA's terms (dora.layer_linears): (lin, input, input dtype, group,
        # saved bytes through it, its own saved LoRA bytes, adapted by DoRA)
        self.marks: list[tuple] = []
        self.nograd: set[str] = set()  # tensors that need no gradient (a frozen layer input and what it feeds)
        self.order: list[str] = []  # every save in forward order (activation offloading's stash: offload.py)
        self.mark_starts: list[int] = []  # per marks entry: len(order) when that linear began
        self._totals: dict[str | None, int] = {None: 0}  # kept bytes, all and per group, as they are kept

    def grad(self, *names: str) -> bool:
        """True when any of the named tensors needs a gradient: only then does the op on them record a node
        (torch autograd records nothing when no input requires grad; a node saves an input only for another input's
        gradient: derivatives.yaml, e.g. bmm saves mat2 for self's gradient, should_compute_output)."""
        return any(n not in self.nograd for n in names)

    def frozen(self, name: str) -> str:
        self.nograd.add(name)
        return name

    def tensor(self, name: str, nbytes: int) -> str:
        old = self.size.get(name)
        self.size[name] = nbytes
        if old is not None and name in self.kept:  # resized after it was kept
            self._count(self.kept[name], nbytes - old)
        return name

    def keep(self, name: str, group: str) -> None:
        self.order.append(name)
        if name in self.kept:
            self.shared.add(name)
        else:
            self.kept[name] = group
            self._count(group, self.size[name])

    def _count(self, group: str, nbytes: int) -> None:
        self._totals[None] += nbytes
        self._totals[group] = self._totals.get(group, 0) + nbytes

    def new(self, name: str, nbytes: int, group: str) -> str:
        self.tensor(name, nbytes)
        self.keep(name, group)
        return name

    def total(self, group: str | None = None) -> int:
        return self._totals.get(group, 0)


def casts(train: TrainSpec, in_bytes: int) -> bool:
    """PEFT's _cast_input_dtype copies a LoRA linear's input whenever its dtype is not the adapter's: by name, so
    bf16 activations into fp16 adapters (same size) are copied too. 2-byte inputs are in the compute dtype."""
    return ("fp32" if in_bytes == 4 else train.compute_dtype) != train.lora_dtype


def _linear(sv: Saved, ctx: Ctx, lin: Linear, x: str, in_bytes: int, group: str) -> str:
    """Run one (possibly LoRA-adapted) linear on tensor x; returns its output's name."""
    x_grad = sv.grad(x)
    sv.mark_starts.append(len(sv.order))
    if ctx.train.bits == 8 and lin.quantizable and x_grad:
        # bitsandbytes MatMul8bitLt.forward keeps ctx.tensors = (CAt, subA, A) as plain attributes whenever its
        # input needs a gradient: A (this input) lives with the graph node, out of reach of saved-tensor hooks,
        # so gradient checkpointing does not drop it (autograd/_functions.py)
        sv.int8_inputs.add(x)
    before = sv.total()
    adapted = False
    if ctx.method == "full":
        sv.keep(x, group)
    elif is_target(lin, ctx.train):
        adapted = ctx.train.dora
        if ctx.dropout:
            sv.new(f"{lin.name}.drop", lin.in_features * ctx.lb, group)  # lora_A's input, for its weight's gradient
            if x_grad:  # nn.Dropout on a tensor without grad records no node: its mask dies at once
                sv.new(f"{lin.name}.mask", lin.in_features, group)
        elif casts(ctx.train, in_bytes):
            sv.new(f"{lin.name}.cast", lin.in_features * ctx.lb, group)
        else:
            sv.keep(x, group)
        sv.new(f"{lin.name}.A", ctx.r * ctx.lb, group)
    own = sv.total() - before
    if adapted:  # DoRA's products keep lora_result and base_result (dora.saved_items)
        for suffix, nbytes in dora.saved_items(lin, ctx.train, ctx.dtype_of(in_bytes)):
            sv.new(f"{lin.name}.{suffix}", nbytes, group)
    sv.marks.append((lin, x, ctx.dtype_of(in_bytes), group, sv.total(), own, adapted))
    out = sv.tensor(f"{lin.name}.out", lin.out_features * ctx.e)
    return out if x_grad or ctx.method == "full" or is_target(lin, ctx.train) else sv.frozen(out)


def _norm(sv: Saved, ctx: Ctx, x: str, h: int, kind: str, group: str, name: str) -> str:
    if not sv.grad(x) and ctx.method != "full":  # a frozen weight on an input without grad: no node
        return sv.frozen(sv.tensor(f"{name}.out", h * ctx.e))
    if kind == "layer":  # LayerNorm saves input, fp32 mean and rstd
        sv.keep(x, group)
        sv.new(f"{name}.stats", 8, group)
    elif ctx.liger:  # LigerRMSNormFunction saves its input as is (no fp32 copy) and an fp32 rstd per row
        sv.keep(x, group)
        sv.new(f"{name}.rstd", 4, group)
    else:  # RMSNorm: fp32 view of the input (a copy if 16-bit) and rsqrt; pow(2) and the mul by rsqrt both save
        # that fp32 tensor (a storage saved twice: activation offloading's dedupe keeps it on the device)
        if ctx.e == 4:
            sv.keep(x, group)
            sv.keep(x, group)
        else:
            sv.new(f"{name}.x32", 4 * h, group)
            sv.keep(f"{name}.x32", group)
        sv.new(f"{name}.rstd", 4, group)
        if ctx.method == "full":  # a trained weight: `weight * normed` saves the normalized input for its gradient
            # (LlamaRMSNorm: in the activations' dtype after .to(input_dtype); Gemma's (1 + weight) * x: fp32)
            sv.new(f"{name}.normed", h * (4 if ctx.gemma_norm else ctx.e), group)
    return sv.tensor(f"{name}.out", h * ctx.e)


def _attention(sv: Saved, ctx: Ctx, model: ModelSpec, layer: LayerSpec, x_norm: str) -> None:
    a, kv, d, h, e = model.num_heads, model.num_kv_heads, model.head_dim, model.hidden_size, ctx.e
    lins = {lin.name: lin for lin in layer.linears}
    fused = lins.get("qkv_proj") or lins.get("query_key_value")
    fused_out = None
    if fused:  # q, k, v are views of one output
        out = fused_out = _linear(sv, ctx, fused, x_norm, e, "attn")
        q = k = v = out
        if model.model_type == "falcon" and model.hf_config.get("new_decoder_architecture"):
            # FalconAttention._split_heads copies k and v out of the fused output (fused_qkv[..., [-2], :]) and
            # broadcasts them to every query head; the reshape for attention materializes a·d each
            kv = a
            v = _follows(sv, out, sv.tensor("v.bcast", a * d * e))  # frozen if the fused output is
    else:
        q = _linear(sv, ctx, lins["q_proj"], x_norm, e, "attn")
        k = _linear(sv, ctx, lins["k_proj"], x_norm, e, "attn")
        v = _linear(sv, ctx, lins["v_proj"], x_norm, e, "attn")
    if layer.qk_norm:  # Qwen3 q_norm / k_norm: RMSNorm over head_dim
        q = _norm(sv, ctx, q, a * d, "rms", "attn", "q_norm")
        k = _norm(sv, ctx, k, kv * d, "rms", "attn", "k_norm")
        sv.tensor("q_norm.rstd", 4 * a), sv.tensor("k_norm.rstd", 4 * kv)
    if model.model_type != "opt":  # rotary: q*cos + rotate_half(q)*sin makes new q and k
        q = _follows(sv, q, sv.tensor("q.rot", a * d * e))
        k = _follows(sv, k, sv.tensor("k.rot", kv * d * e))
    qg, kg, vg = sv.grad(q), sv.grad(k), sv.grad(v)
    if not (qg or kg or vg):  # layer 0 with frozen q, k, v projections: the attention core records no node
        out = "attn.out" if ctx.attention in FUSED else "attn.ctx"
        out = sv.frozen(sv.tensor(out, a * d * (ctx.c if ctx.attention == FA2 else e)))
    elif ctx.attention == FA2:
        # transformers' flash_attention_forward (integrations/flash_attention.py) -> _flash_attention_forward:
        # no mask (flash_attention_mask returns None for unpadded batches), sliding windows and soft-capping
        # inside the kernel, GQA native (k/v keep their kv heads). fa_peft_integration_check casts fp32 q/k/v
        # (prepare_model_for_kbit_training's fp32 stream) to the model dtype: new tensors, the ones saved.
        # flash_attn_interface.py FlashAttnFunc.forward saves q, k, v, out and the fp32 softmax_lse (b, a, s).
        if e != ctx.c:
            q = sv.tensor("q.fa", a * d * ctx.c)
            k = sv.tensor("k.fa", kv * d * ctx.c)
            v = sv.tensor("v.fa", kv * d * ctx.c)
        for t in (q, k, v):
            sv.keep(t, "attn")
        sv.new("attn.out", a * d * ctx.c, "attn")
        sv.new("attn.lse", a * 4, "attn")
    elif ctx.attention == "sdpa":
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
        sv.new("probs.fp32", a * ctx.s * 4, "attn")  # _safe_softmax saves its result, probs @ v (fp32, no cast)
        sv.keep("probs.fp32", "attn")  # the same storage: offloading's dedupe keeps that second save on the device
    else:
        # each matmul saves one operand for the other's gradient (derivatives.yaml bmm: mat2 for self, self for
        # mat2): q @ k^T keeps k for q and q for k; probs @ v keeps v for probs and probs for v. All of q, k, v
        # need a gradient but in layer 0 with some of its projections frozen (first_input_frozen)
        sg = qg or kg  # the scores, and the probabilities, need a gradient
        if fused and v == fused_out and model.model_type in ("phi3", "gpt_neox") and kv == a:
            # v is a strided view of the fused output: torch.matmul folds probs @ v to a bmm through
            # v.expand(...).reshape(b·a, s, d), which copies a view whose batch and head dims do not merge
            # (aten/src/ATen/native/LinearAlgebra.cpp _matmul_impl); bmm saves that copy, not the fused output
            v = _follows(sv, v, sv.tensor("v.copy", a * d * e))
        if kv != a:  # repeat_kv copies k and v to every head
            k = _follows(sv, k, sv.tensor("k.rep", a * d * e))
            v = _follows(sv, v, sv.tensor("v.rep", a * d * e))
        for t, saved in ((k, qg), (v, sg), (q, kg)):
            if saved:
                sv.keep(t, "attn")
        if softcapped(model) and sg:  # tanh(scores / cap) saves its output
            sv.new("scores.tanh", a * ctx.s * e, "attn")
        if softmax_in_dtype(model):  # one storage saved by softmax (its result) and by probs @ v's bmm (self):
            sv.tensor("probs", a * ctx.s * e)  # offloading's dedupe keeps the second save on the device
            for saved in (sg, vg):
                if saved:
                    sv.keep("probs", "attn")
        else:
            sv.tensor("probs.fp32", a * ctx.s * 4)
            if sg:
                sv.keep("probs.fp32", "attn")  # softmax(dtype=float32) saves its result
            if e != 4 and vg:
                sv.new("probs", a * ctx.s * e, "attn")  # .to(q.dtype), saved by probs @ v
            elif vg:  # fp32 activations: the cast is a no-op and probs @ v saves the softmax's own output again
                sv.keep("probs.fp32", "attn")
    # o_proj's input: transpose(1, 2).contiguous(). The fused kernels already write their output in the
    # (b, s, heads, d) layout, so the copy is a no-op there; eager's matmul output needs a real copy.
    ctx_t = "attn.out" if ctx.attention in FUSED else "attn.ctx"
    if ctx_t not in sv.size:
        sv.tensor(ctx_t, a * d * e)
    o = lins.get("o_proj") or lins.get("out_proj") or lins.get("dense")
    o_out = _linear(sv, ctx, o, ctx_t, ctx.c if ctx.attention == FA2 else e, "attn")
    if _opt_dropout(model) and sv.grad(o_out):  # OPT's residual dropout keeps a bool mask
        sv.new("attn.resid_mask", h, "attn")
    return o_out


def _follows(sv: Saved, src: str, new: str) -> str:
    """`new`, made from `src` by ops with frozen (or no) other operands, needs a gradient only if `src` does."""
    return new if sv.grad(src) else sv.frozen(new)


def _opt_dropout(model: ModelSpec) -> bool:
    """OPT drops out the attention and MLP outputs in training (OPTConfig.dropout, default 0.1)."""
    return model.model_type == "opt" and bool(model.hf_config.get("dropout", 0.1))


# transformers' tanh-GELU approximations written as chains of elementwise ops (activations.py, 5.24) save more than
# their input: FastGELUActivation ("gelu_fast": 0.5*x*(1+tanh(x*c*(1+0.044715*x*x)))) keeps 6 more tensors of x's
# size (0.5*x, x*c, 0.044715*x, 1+..., tanh's output, 1+tanh), NewGELUActivation ("gelu_new") 3 (tanh's output,
# 0.5*x, 1+tanh); counted with saved_tensors_hooks on CPU. "gelu_pytorch_tanh" and "gelu" are one op saving x.
_TANH_GELU_SAVED = {"gelu_fast": 6, "gelu_new": 3}


def _dense_mlp(sv: Saved, ctx: Ctx, layer: LayerSpec, x_norm: str, hidden_act: str, group="mlp") -> str:
    lins = {lin.name: lin for lin in layer.linears}
    e = ctx.e
    if layer.mlp == "plain":
        up = lins.get("dense_h_to_4h") or lins.get("fc1")
        down = lins.get("dense_4h_to_h") or lins.get("fc2")
        f = _linear(sv, ctx, up, x_norm, e, group)
        act = _follows(sv, f, sv.tensor("mlp.act", up.out_features * e))
        if not sv.grad(f):  # a frozen up projection on an input without grad (first_input_frozen)
            pass
        elif hidden_act == "relu":  # ReLU saves its output
            sv.keep(act, group)
        else:
            sv.keep(f, group)
            for j in range(_TANH_GELU_SAVED.get(hidden_act, 0)):
                sv.new(f"mlp.gelu.{j}", up.out_features * e, group)
        return _linear(sv, ctx, down, act, e, group)
    fused = lins.get("gate_up_proj")
    if fused:  # Phi-3: gate and up are views of one output; act saves the view (the whole storage)
        g = u = _linear(sv, ctx, fused, x_norm, e, group)
        i = fused.out_features // 2
        if sv.grad(g):
            sv.keep(g, group)
    else:
        gate, up = lins["gate_proj"], lins["up_proj"]
        i = gate.out_features
        g = _linear(sv, ctx, gate, x_norm, e, group)
        u = _linear(sv, ctx, up, x_norm, e, group)
        # act(gate) saves gate for gate's gradient; act(gate) * up saves up for act's gradient and act(gate) for
        # up's (Liger's SiLU/GELU-mul saves both inputs whenever either needs a gradient)
        gg, ug = sv.grad(g), sv.grad(u)
        for t in (g, u):
            if gg or (ctx.liger and ug):
                sv.keep(t, group)
    if not ctx.liger and sv.grad(u):  # Liger's SiLU/GELU-mul saves gate and up only
        sv.new("mlp.act", i * e, group)  # act(gate), saved by the product
    m = sv.tensor("mlp.prod", i * e)
    if not sv.grad(g, u):
        sv.frozen(m)
    return _linear(sv, ctx, lins["down_proj"], m, e, group)


def _moe(sv: Saved, ctx: Ctx, model: ModelSpec, layer: LayerSpec, x_norm: str) -> None:
    e, k, mi, E = ctx.e, layer.experts_per_token, layer.expert_intermediate, layer.num_experts
    h = model.hidden_size
    if linear_experts(ctx.train):  # transformers 4: the router is a (LoRA-adaptable) nn.Linear
        _linear(sv, ctx, experts_router(model, layer), x_norm, e, "mlp")
    # transformers 5: a frozen router and frozen 3-D experts on an input without grad record no node
    frozen = not sv.grad(x_norm) and not linear_experts(ctx.train)
    if not frozen:
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
            slot = 2 * mi * e + mi * e + h * e + 8 + 8 + e
            if ctx.method == "full":  # trained 3-D experts: each grouped_mm (integrations/moe.py 5.24) saves its input
                slot += h * e + mi * e  # for the weight gradient: selected_hidden_states and the act(gate) * up product
            sv.new("experts", k * slot, "mlp")
    lins = {lin.name: lin for lin in layer.linears}
    if "shared_expert_gate" in lins:  # Qwen2-MoE: a dense shared expert scaled by sigmoid(shared_expert_gate(x))
        out = _dense_mlp(sv, ctx, layer, x_norm, "silu")
        sig = _linear(sv, ctx, lins["shared_expert_gate"], x_norm, e, "mlp")
        if sv.grad(sig):  # the product with the sigmoid saves each factor for the other's gradient
            sv.keep(out, "mlp")
        if sv.grad(out):
            sv.new("shared.sig", e, "mlp")


@lru_cache(maxsize=4096)
def layer_saved(model: ModelSpec, layer: LayerSpec, ctx: Ctx) -> Saved:
    """Everything one decoder layer keeps for backward, per token. Its input "x" (the previous layer's output)
    is kept only if an op here saves it: an fp32 RMSNorm or a LayerNorm does, a 16-bit RMSNorm saves its own
    fp32 copy instead. Cached (the walk is most of an uncached estimate's time): callers read it, never change it."""
    sv = Saved()
    h = model.hidden_size
    norm_kind = "layer" if model.model_type in LAYER_NORM_TYPES else "rms"
    x = sv.tensor("x", h * ctx.e)
    if ctx.frozen_input:
        sv.frozen(x)
    n1 = _norm(sv, ctx, x, h, norm_kind, "attn", "norm1")
    # Falcon-40B runs ln_mlp right after ln_attn (FalconDecoderLayer.forward): the save order offload.deduped reads
    early = layer.parallel_attn and model.model_type == "falcon" and model.hf_config.get("new_decoder_architecture")
    n2 = _norm(sv, ctx, x, h, norm_kind, "mlp", "norm2") if early else None
    o_out = _attention(sv, ctx, model, layer, n1)
    if layer.parallel_attn:  # Falcon-7B: one norm feeds both; GPT-NeoX / Falcon-40B: a second norm of x
        n_ln = 2 if model.model_type == "gpt_neox" or model.hf_config.get("new_decoder_architecture") else 1
        n2 = n2 or (_norm(sv, ctx, x, h, norm_kind, "mlp", "norm2") if n_ln == 2 else n1)
    else:
        h1 = sv.tensor("h1", h * ctx.e)  # x + attention output
        if not sv.grad(x, o_out):
            sv.frozen(h1)
        n2 = _norm(sv, ctx, h1, h, norm_kind, "mlp", "norm2")
    if layer.mlp == "moe":
        _moe(sv, ctx, model, layer, n2)
        mlp_grad = True
    else:
        mlp_out = _dense_mlp(sv, ctx, layer, n2, model.hf_config.get("hidden_act")
                             or model.hf_config.get("activation_function") or "silu")
        mlp_grad = sv.grad(mlp_out)
    if _opt_dropout(model) and mlp_grad:
        sv.new("mlp.resid_mask", h, "mlp")
    if model.model_type == "gemma2":  # post-attention / post-feedforward RMSNorms on the o_proj and down_proj
        # outputs: each keeps an fp32 input (or copy) and rsqrt
        sv.new("norm.post", (int(sv.grad(o_out)) + int(mlp_grad)) * (4 * h + 4), "mlp")
        if not ctx.liger:  # pow and the mul by rsqrt both save that fp32 tensor: offloading's dedupe keeps it
            sv.keep("norm.post", "mlp")
    return sv


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
    # activation backward (moments.plain_act_backward), a checkpointed MoE layer's recompute in its experts (recompute.
    # moe_stop: its hooks, not the offload's, hold what it saves); 0 offloading all unless checkpointed (offload.py)
    bwd_work_norm: int = 0  # per token: at the layer's input norm's backward, its last op (moments.input_norm_backward)
    fwd_mlp_out: int = 0  # per token: at the last layer's MLP output linear's LoRA add (moments.mlp_out_forward)


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


_LAYER_KEYS: dict = {}  # (_LAYER_FIELDS, seq_len or 1) -> the layer key: train at batch 1, AdamW
_LAYER_FIELDS = attrgetter(*(f for f in TRAIN_FIELDS if f not in ("seq_len", "batch_size", "optimizer")))


def per_seq(model: ModelSpec, train: TrainSpec) -> bool:
    """Whether activations() depends on the sequence length beyond the tokens its per-token figures multiply (it
    depends on the batch through rotary cos / sin, shared by it): eager scores and masks are s wide, an SDPA mask
    appears at a window, offloading compares each tensor's size with TRL's minimum."""
    attention = effective_attention(model, train)
    return (attention not in FUSED or train.activation_offload == "all" and not train.gradient_checkpointing
            or attention == "sdpa" and sdpa_gets_a_mask(model, 1 << 62, train.transformers))  # at any length


_AT_BATCH_ONE: dict = {}  # (_LAYER_FIELDS, seq_len) -> train at batch 1, AdamW: one object per key


def activations(model: ModelSpec, train: TrainSpec) -> Activations:
    """The per-token activation figures of this configuration (_activations). They depend on the batch only
    through rotary cos / sin, (1, s, head_dim) shared by the batch, so they are computed once at batch 1 and
    shared by every batch; offloading every saved tensor decides per tensor size (TRL's minimum), per batch."""
    if train.activation_offload == "all" and not train.gradient_checkpointing:
        return _activations(model, train)
    fields = (_LAYER_FIELDS(train), train.seq_len)
    one = _AT_BATCH_ONE.get(fields)
    if one is None:
        if len(_AT_BATCH_ONE) > 65536:
            _AT_BATCH_ONE.clear()
        one = _AT_BATCH_ONE[fields] = train.variant(batch_size=1, optimizer="adamw")
    a = _at_batch_one(model, one)
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
    # one object per distinct key: the per-layer caches below then match it by identity, not field by field
    fields = (_LAYER_FIELDS(train), train.seq_len if per_seq else 1)
    layer_key = _LAYER_KEYS.get(fields)
    if layer_key is None:
        if len(_LAYER_KEYS) > 65536:
            _LAYER_KEYS.clear()
        layer_key = _LAYER_KEYS[fields] = train.variant(batch_size=1, optimizer="adamw", seq_len=fields[1])
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
    fwd_transient += promoted + moments.liger_fused_gate_up(model, train)
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
                       offloaded_layers=train.activation_offload == "all" and not train.gradient_checkpointing,
                       bwd_work_softmax=softmax, forward_only=forward_only,
                       int8_graph=moments.int8_graph_held(model, layer_key),
                       bwd_work_act=act_bwd if train.gradient_checkpointing or train.activation_offload != "all" else 0,
                       bwd_work_norm=moments.input_norm_backward(model, layer_key),
                       fwd_mlp_out=moments.mlp_out_forward(model, layer_key))


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


def dora_transient(model: ModelSpec, train: TrainSpec) -> int:
    """The largest weight-sized DoRA transient (absolute): get_weight_norm's work in one adapted linear's forward
    (dora.norm_transient), which a checkpointed layer's recompute makes again in backward."""
    if train.method != "lora" or not train.dora:
        return 0
    return max((dora.norm_transient(lin, train, False)[0] for _, layer in model.layers for lin in layer.linears
                if is_target(lin, train)), default=0)
