"""What one decoder layer saves for backward, op by op, for the code path that runs (activations.py
adds up the layers; moments.py, recompute.py, offload.py and dora.py read the same walk).

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

from dataclasses import dataclass
from functools import lru_cache

from memplan.estimate import dora
from memplan.estimate.attention import FA2, FUSED, effective_attention, sdpa_gets_a_mask, softcapped
from memplan.estimate.attention import softmax_in_dtype
from memplan.estimate.experts import expert_mlp, linear_experts
from memplan.estimate.experts import router as experts_router
from memplan.estimate.lora import is_target
from memplan.estimate.weights import unquantized_dtype_bytes
from memplan.spec import DTYPES, LayerSpec, Linear, ModelSpec, TrainSpec

LAYER_NORM_TYPES = ("falcon", "gpt_neox", "opt")  # nn.LayerNorm in every layer; the others' are RMSNorms


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
        if sv.grad(g) and ctx.liger:  # @ensure_contiguous copies both halves: two saves (liger-kernel ops/utils.py)
            sv.new("mlp.gate", i * e, group)
            sv.new("mlp.up", i * e, group)
        elif sv.grad(g):
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
