"""DoRA (Liu et al. 2024, weight-decomposed LoRA) as PEFT 0.21.2 runs it in training, one adapted linear at a time:
what it saves for backward, what its forward holds on top, and the working set of its backward.

The code path (peft/tuners/lora/layer.py Linear.forward, bnb.py Linear4bit / Linear8bitLt.forward, variants.py
DoraLinearVariant.forward, dora.py DoraLinearLayer.forward):

    R = base_layer(x)                      # o wide, in x's dtype (Linear4bit casts back; 4-bit: R.clone())
    x = x.to(lora dtype)                   # _cast_input_dtype: a copy when the dtypes differ
    dropout p > 0: x = dropout(x); base_result = None, else base_result = R
    lora_weight = lora_B(lora_A(eye(in))).T           # get_lora_weight: in x in eye, out x in
    weight = dequantize_module_weight(base).to(x.dtype)  # 4-bit: compute dtype, 8-bit: fp32; else the parameter
    weight_norm = norm(weight + scaling * lora_weight.detach(), dim=1).detach()
    mns = magnitude / weight_norm          # (1, out)
    lora_result = lora_B(lora_A(x))
    base_result = base_result or F.linear(x, weight)  # dropout > 0: the dropped-out x against the (copied) weight
    rd = (mns - 1) * base_result + mns * lora_result * scaling
    result = (R + rd).to(R.dtype)

Autograd (torch derivatives.yaml): a product of two tensors that need gradients saves both, so (mns - 1) * base
keeps base_result and mns * lora_result keeps lora_result; F.linear keeps its weight for the input gradient
(dropout > 0). lora_weight is detached: eye, lora_A(eye) and lora_weight die with the forward's frame (under
checkpointing eye dies at once: the checkpoint's pack hook holds no tensor). The backward engine casts each
gradient to its input's dtype (validate_outputs) and reduces broadcast ones (sum_to) after the node ran, so
(mns - 1) * base's backward holds grad * (mns - 1) and grad * base beside the gradients still waiting:
the one for R (the frozen base runs after the adapter: lower sequence number), lora_result's, the incoming one.

Per token unless named absolute. The meta trace (memplan/trace) runs this very code and is the check:
tests/test_validate_random.py holds the cases.
"""
from __future__ import annotations

from dataclasses import dataclass

from memplan.estimate.lora import is_target
from memplan.spec import DTYPES, Linear, ModelSpec, TrainSpec

# a branch's last linear: its output is added to the residual stream, so its incoming gradient is that stream's
RESIDUAL_LINEARS = ("o_proj", "out_proj", "dense", "down_proj", "dense_4h_to_h", "fc2")
# ... unless a norm or a dropout sits between them (Gemma-2/3, OLMo-2 post-norms; OPT's residual dropout)
_FRESH_BRANCH_GRAD = ("gemma2", "gemma3_text", "olmo2", "opt")


def promote(a: str, b: str) -> str:
    """torch's type promotion between two float dtypes: equal stays, anything else meets at fp32."""
    return a if a == b else "fp32"


def stream_dtype(train: TrainSpec) -> str:
    """The residual stream's dtype (weights.unquantized_dtype_bytes, by name)."""
    if train.bits == 32 or train.upcast_applies or train.compute_dtype == "fp32":
        return "fp32"
    return train.compute_dtype


def weight_dtype(train: TrainSpec, lin: Linear) -> str:
    """DoRA's `weight` before .to(x.dtype): bitsandbytes' dequantized copy (dequantize_4bit to the compute dtype;
    int8_vectorwise_dequant to fp32), or the unquantized parameter in its training dtype."""
    if train.quantized and lin.quantizable:
        return "fp32" if train.bits == 8 else train.compute_dtype
    return stream_dtype(train)


def weight_copy(train: TrainSpec, lin: Linear) -> int:
    """Absolute bytes of the `weight` DoRA holds when it is not the parameter itself (dequantized or cast)."""
    if (train.quantized and lin.quantizable) or weight_dtype(train, lin) != train.lora_dtype:
        return lin.weight_numel * DTYPES[train.lora_dtype]
    return 0


def saved_items(lin: Linear, train: TrainSpec, x_dtype: str) -> list[tuple[str, int]]:
    """What DoRA saves per token beyond plain LoRA's (input, mask, lora_A output): lora_result (lora dtype) and
    base_result (R itself in x's dtype, or F.linear(dropout(x), weight) in the lora dtype)."""
    o, la = lin.out_features, train.lora_dtype
    base = la if train.lora_dropout > 0 else x_dtype
    return [("dora_lora", o * DTYPES[la]), ("dora_base", o * DTYPES[base])]


def saved_weight(lin: Linear, train: TrainSpec) -> int:
    """Absolute: the weight F.linear(dropout(x), weight) keeps for backward (dropout > 0, when it is a copy)."""
    return weight_copy(train, lin) if train.lora_dropout > 0 else 0


def norm_transient(lin: Linear, train: TrainSpec, checkpointed: bool) -> tuple[int, int]:
    """Absolute bytes at get_weight_norm (the peak of the weight-sized work) and what stays until the DoRA forward
    returns beside the saved weight. eye (in x in) and lora_weight (out x in) are alive to the end of forward
    (lora_A saved eye; the graph hangs on lora_weight); under checkpointing the pack hook keeps no eye, so eye dies
    with get_lora_weight. Then the dequantized weight (and its cast), and weight + scaling * lora_weight: two
    more out x in tensors."""
    i, o, la = lin.in_features, lin.out_features, train.lora_dtype
    lb = DTYPES[la]
    eye, lw = i * i * lb, i * o * lb
    src = weight_dtype(train, lin)
    copy = weight_copy(train, lin)
    if train.quantized and lin.quantizable:
        deq = o * i * DTYPES[src]
        at_cast = deq + (copy if src != la else 0)
    else:
        at_cast = copy
    add = max(at_cast, copy + 2 * o * i * lb)
    held_after = copy if train.lora_dropout == 0 else 0  # dropout > 0: saved_weight counts it
    if checkpointed:
        return max(eye + lw, lw + add), lw + held_after
    return eye + lw + add, eye + lw + held_after


@dataclass(frozen=True)
class DoraLinear:
    """One DoRA-adapted linear of a layer, per token unless absolute."""

    name: str
    through: int  # the layer's saved bytes up to and including this linear's (forward order)
    layer_input: int  # of which the layer's input (checkpointing keeps it anyway, as the stored input)
    after: int  # the layer's saved bytes after it
    fwd: int  # on top of `through` at its forward's peak (the adapter sum), no checkpointing
    fwd_norm: int  # on top of what was saved before it, at get_weight_norm, no checkpointing
    ckpt_fwd: int  # alive in a checkpointed forward (nothing saved) at the adapter sum
    ckpt_norm: int  # ... at get_weight_norm
    offload_fwd: int  # at the adapter sum under activation offload all: saved tensors stream out, what is made here
    # is still on the device, and the locals (saved or not: an offloaded tensor a frame still holds stays)
    offload_norm: int  # ... at get_weight_norm: the locals, dropout's mask and the forward stash before the linear
    bwd: int  # on top of `through` at its backward's peak: DoRA's gradients, the residual's, its siblings'
    pre_grads: int  # the gradients alive when a checkpointed layer's recompute runs (its last linear's first steps)
    stop: int  # the layer's last linear: on top of `through` where a recompute stops (0 for the others)
    weight: int  # absolute: the weight F.linear keeps (dropout > 0, a copy)
    weight_before: int  # absolute: the weights earlier DoRA linears of the layer keep (dropout > 0)
    norm_abs: int  # absolute at get_weight_norm
    held_abs: int  # absolute held to the end of its forward beside `weight`
    ckpt_norm_abs: int
    ckpt_held_abs: int


def layer_linears(model: ModelSpec, train: TrainSpec, marks: list, kept: set, sizes: dict,
                  total: int, nograd: set = frozenset(), stash: tuple = ()) -> tuple[DoraLinear, ...]:
    """The DoraLinear terms of one layer from the saved-set walk (saved_set.layer_saved): `marks` lists every
    linear in forward order as (lin, input name, input dtype, group, the layer's saved bytes through it, its own
    saved LoRA bytes, adapted by DoRA); `nograd` the tensors needing no gradient (layer 0's frozen input: F.linear
    of a dropout output without grad and a detached weight records no node, so it saves no weight); `stash` per
    mark, under activation offload all, what TRL's forward stash holds from before the linear at its
    get_weight_norm (offload.dora_norm_stash)."""
    if train.method != "lora" or not train.dora:
        return ()
    h = model.hidden_size
    st = stream_dtype(train)
    eb, la = DTYPES[st], train.lora_dtype
    lb = DTYPES[la]
    drop = train.lora_dropout > 0
    out, weights = [], 0
    pre = _pre_recompute_grads(model, train, marks)
    for pos, (lin, x, xd, group, through, own, adapted) in enumerate(marks):
        if not adapted:
            continue
        i, o = lin.in_features, lin.out_features
        r = xd  # the base output's dtype (nn.Linear: x's; Linear4bit / 8bit cast back to x's)
        bd = la if drop else r
        q, s = promote(la, bd), promote(r, la)
        rb, qb, sb, bdb, xb = DTYPES[r], DTYPES[q], DTYPES[s], DTYPES[bd], DTYPES[xd]
        # forward: the adapter sum's moments, beside R (unsaved under dropout) and x's lora-dtype copy (a local
        # of Linear.forward whenever dropout replaces it)
        m = max(o * (qb + 2 * lb), o * (2 * qb + lb), o * (qb + sb), o * (sb + rb) if s != r else 0)
        unsaved = (o * rb + (i * lb if xd != la else 0)) if drop else 0
        # outputs of the siblings run before it on the same input, still locals (q and k at v_proj; at up_proj,
        # gate_proj's output and act(gate): `act_fn(gate_proj(x)) * up_proj(x)` evaluates its left side first)
        siblings = [(p, mark[0], mark[2]) for p, mark in enumerate(marks)
                    if p != pos and mark[1] == x and mark[3] == group]
        earlier = [sib for p, sib, _ in siblings if p < pos]
        gate = next((sib for sib in earlier if sib.name == "gate_proj"), None)
        prior = sum(sib.out_features * eb for sib in earlier) + (gate.out_features * eb if gate else 0)
        branch_in = "norm2.out" if group == "mlp" and "norm2.out" in sizes else "norm1.out"
        frame = (i * xb if x not in kept else 0) + _residual_frame(group, kept, sizes, h * eb)
        frame += sizes[branch_in] if branch_in in sizes and branch_in not in kept and branch_in != x else 0
        frame += prior
        # Liger's Phi-3 MLP: the gate_up output, the forward's local `up_states` beside the contiguous copies of its
        # halves that LigerSiLUMulFunction saved, until down_proj returns (moments.down_forward; the meta trace's
        # live tensors in a checkpointed recompute: draw 60 of seed 88213)
        up_states = next((m[0].out_features * eb for m in marks if m[0].name == "gate_up_proj"), 0) \
            if train.liger and lin.name == "down_proj" else 0
        frame += up_states
        created = o * lb + (o * bdb if drop else 0)  # lora_result, F.linear's output: made after the norm
        fwd = unsaved + m + frame
        # the recompute stops in the pack hook of the layer's last saved tensor: the last linear's lora_result,
        # saved by mns * lora_result before that product is made; (mns - 1) * base_result exists by then
        stop = unsaved + frame + o * qb if pos == len(marks) - 1 else 0
        fwd_norm = unsaved + frame - created
        # offloaded: every local is on the device whether saved or not: the input, the residual stream, the
        # branch's input, the siblings' outputs, Linear.forward's `result` and x's lora-dtype copy, dropout's
        # output (DoraLinearVariant.forward passes it on); the mask only in TRL's stash
        res = h * eb
        branch = sizes[branch_in] if branch_in in sizes and branch_in != x else 0
        # (gate_proj's own output is no local: act_fn's argument, alive only as its saved, offloaded input)
        local = (i * xb + res + branch + sum(sib.out_features * eb for sib in earlier) + o * rb
                 + (i * lb if xd != la else 0) + (i * lb if drop else 0) + up_states)
        mask = i if drop and x not in nograd else 0
        offload_norm = local + mask + (stash[pos] if stash else 0)
        offload_fwd = local + m + created
        # checkpointed forward: nothing saved, the linear's own tensors alive as locals
        ck_own = own + o * lb + o * bdb + (o * rb if drop else 0) + (i * lb if drop and xd != la else 0)
        ck_frame = (i * xb if x != "x" else 0) + (h * eb if group == "mlp" and "h1" in sizes else 0) + prior + up_states
        ckpt_fwd = ck_own + m + ck_frame
        ckpt_norm = ck_own - created + ck_frame
        # backward, beside the incoming gradients (_incoming): p3 = p2 * scaling's gradient, then p2 = mns *
        # lora_result's backward makes lora_result's and mns's gradients (three o x lora dtype, lora_result still
        # saved); then p1 = (mns - 1) * base_result's makes its two products in q, lora_result released and its
        # gradient (as large) waiting for lora_B
        bwd = _incoming(model, train, lin, xd) + max(3 * o * lb, 2 * o * qb)
        # siblings on the same input: the gradients of those run before it wait (q/k after v; gate after up),
        # those run after it have begun the input's gradient
        bwd += sum(sib.out_features * DTYPES[sib_dtype] for p, sib, sib_dtype in siblings if p < pos)
        bwd += i * xb if any(p > pos for p, _, _ in siblings) else 0
        w = saved_weight(lin, train) if x not in nograd else 0
        norm_abs, held_abs = norm_transient(lin, train, False)
        ck_norm_abs, ck_held_abs = norm_transient(lin, train, True)
        out.append(DoraLinear(lin.name, through, sizes["x"] if "x" in kept else 0, total - through, fwd, fwd_norm,
                              ckpt_fwd, ckpt_norm, offload_fwd, offload_norm, bwd, pre, stop, w,
                              weights, norm_abs, held_abs, ck_norm_abs, ck_held_abs))
        weights += w
    return tuple(out)


def _incoming(model: ModelSpec, train: TrainSpec, lin: Linear, xd: str) -> int:
    """Per token, once rd's gradient is made: the residual stream's gradient and the distinct gradients waiting
    for R (x's dtype) and for rd (q). The incoming gradient is (R + rd).to(R.dtype)'s: cast to s by ToCopyBackward,
    to R's and rd's dtypes by the engine; for a branch's last linear it is the residual stream's own."""
    la, st = train.lora_dtype, stream_dtype(train)
    o, h = lin.out_features, model.hidden_size
    r = xd
    q = promote(la, la if train.lora_dropout > 0 else r)
    s = promote(r, la)
    res = h * DTYPES[st]
    inc = "res" if (lin.name in RESIDUAL_LINEARS and model.model_type not in _FRESH_BRANCH_GRAD
                    and r == st and o == h) else "inc"
    g_s = inc if s == r else "g_s"
    size = {"res": res, "inc": o * DTYPES[r], "g_s": o * DTYPES[s], "grad_r": o * DTYPES[r],
            "grad_rd": o * DTYPES[q]}
    alive = {"res", g_s if r == s else "grad_r", g_s if q == s else "grad_rd"}
    return sum(size[n] for n in alive)


def _pre_recompute_grads(model: ModelSpec, train: TrainSpec, marks: list) -> int:
    """Per token: the gradients alive when a checkpointed layer's first unpack starts its recompute. The residual
    stream's; when the layer's last linear is a DoRA one, its incoming gradients and p3 = p2 * scaling's
    (MulBackward0 by a number saves nothing, so it runs before anything is unpacked). A frozen bitsandbytes last
    linear saves nothing either (MatMul4Bit / MatMul8bitLt keep their operands in ctx.tensors, plain attributes:
    bitsandbytes autograd/_functions.py 0.50): its backward runs first and its input's gradient waits through the
    recompute (Qwen3-8B QLoRA on q/v/o/up, seed 88213 #117: down_proj's dp at up_proj's DoRA; before -4.5%)."""
    h, eb = model.hidden_size, DTYPES[stream_dtype(train)]
    if not marks:
        return h * eb
    if not marks[-1][6]:
        lin, xd = marks[-1][0], marks[-1][2]
        frozen_bnb = train.quantized and lin.quantizable and not is_target(lin, train)
        return h * eb + (lin.in_features * DTYPES[xd] if frozen_bnb else 0)
    lin, xd = marks[-1][0], marks[-1][2]
    return _incoming(model, train, lin, xd) + lin.out_features * DTYPES[train.lora_dtype]


def _residual_frame(group: str, kept: set, sizes: dict, nbytes: int) -> int:
    """The residual stream a decoder layer's frame holds while its branch runs (`residual` in transformers'
    decoder layers): counted when no op saves it (a 16-bit RMSNorm saves its own fp32 copy instead)."""
    name = "h1" if group == "mlp" and "h1" in sizes else "x"
    return 0 if name in kept else nbytes


def dora_transient(model: ModelSpec, train: TrainSpec) -> int:
    """The largest weight-sized DoRA transient (absolute): get_weight_norm's work in one adapted linear's forward
    (norm_transient), which a checkpointed layer's recompute makes again in backward."""
    if train.method != "lora" or not train.dora:
        return 0
    return max((norm_transient(lin, train, False)[0] for _, layer in model.layers for lin in layer.linears
                if is_target(lin, train)), default=0)
