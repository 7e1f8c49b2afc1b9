"""Activation offloading's device / host split of what each layer keeps (--activation-offload all|checkpoints).

The rules come from the code that runs: TRL's OffloadActivations (trl/models/activation_offloading.py) and
torch.autograd.graph.save_on_cpu around transformers' checkpoint function; memplan/trace/offload.py runs them on
the meta trace. activations.activations() calls device_host(); the per-layer saved set is activations'.
"""
from __future__ import annotations

from functools import lru_cache

from memplan.estimate import activations as act
from memplan.estimate import saved_set
from memplan.estimate.attention import effective_attention, softmax_in_dtype
from memplan.estimate.lora import is_target
from memplan.spec import DTYPES, LayerSpec, ModelSpec, TrainSpec

_QK = {"q_proj", "k_proj", "qkv_proj", "query_key_value"}  # linears whose LoRA makes the attention scores need a grad
_V = {"v_proj", "qkv_proj", "query_key_value"}
MIN_OFFLOAD_SIZE = 1024  # trl OffloadActivations(min_offload_size=1024), bytes
MAX_FWD_STASH = 5  # trl OffloadActivations(max_fwd_stash_size=5)


@lru_cache(maxsize=4096)
def _hooked(model: ModelSpec, layer: LayerSpec, train: TrainSpec, tokens: int, no_input_grad: bool):
    """The layer's saved set as TRL's hooks see it: (the Saved walk, the names saved, those saved twice, those the
    hooks leave on the device: saved a second time, or under min_offload_size)."""
    sv = saved_set.layer_saved(model, layer, saved_set.Ctx.of(train, model))
    kept = [n for n in sv.kept if n != "x" or sv.kept.get("x")]
    shared = deduped(sv, tokens, dora_ids(sv, train))
    if no_input_grad:  # the first layer, its input a frozen embedding's output (no checkpointing: nothing calls
        # enable_input_require_grads): an op whose inputs need no gradient saves nothing, so the input norm saves
        # once or not at all; softmax saves its result only if q or k is adapted (the scores need a gradient),
        # probs @ v's bmm saves the probabilities only if v is (derivatives.yaml, bmm: self for mat2's grad)
        shared -= {"x", "norm1.x32"}
        adapted = {lin.name for lin in layer.linears if is_target(lin, train)}
        if not (adapted & _QK and adapted & _V):
            shared -= {"probs", "probs.fp32"}
    on_device = [n for n in kept if n in shared or sv.size[n] * tokens < MIN_OFFLOAD_SIZE]
    return sv, kept, shared, on_device


@lru_cache(maxsize=4096)
def int8_held(model: ModelSpec, layer: LayerSpec, train: TrainSpec, tokens: int, no_input_grad: bool) -> int:
    """Per token, --activation-offload all without checkpointing: the LLM.int8 inputs on the device beyond what
    TRL's hooks leave there (split). bitsandbytes' MatMul8bitLt.forward keeps its input as `ctx.tensors = (CAt,
    subA, A)`, a plain attribute, not save_for_backward (autograd/_functions.py 0.50), whenever the input or the
    weight needs a gradient: the hooks never see it, so it stays on the device as long as the graph, whatever else
    saves (and offloads) it; a storage the hooks also keep on the device counts once. Layer 0 with a frozen
    embedding (no_input_grad): only the inputs that need a gradient (saved_set._linear)."""
    sv = saved_set.layer_saved(model, layer, act._ctx(model, train, no_input_grad))
    on_device = set(_hooked(model, layer, train, tokens, no_input_grad)[3])
    return sum(sv.size[n] for n in sv.int8_inputs - on_device if n != "x") + act.int8_outliers(sv)


@lru_cache(maxsize=4096)
def split(model: ModelSpec, layer: LayerSpec, train: TrainSpec, tokens: int,
          no_input_grad: bool = False) -> tuple[int, int, int]:
    """--activation-offload all without checkpointing (TRL OffloadActivations' rules, memplan/trace/offload.py):
    (bytes per token a layer keeps on the device, bytes per token brought back at once in its backward, and what
    its attention's backward adds to the kept bytes: its two largest brought back, less what the MLP kept on the
    device, released by the MLP's backward as its nodes unpacked them; not its LLM.int8 inputs: MatMul8bitLt's
    ctx attributes live as long as the graph, which the loss holds through the backward).
    Kept: a storage saved a second time while its first copy is still in the forward stash (deduped(): TRL's
    storage-key dedupe keeps that reference on the device until backward) and tensors under min_offload_size.
    Brought back: a tensor lives until the autograd node after the one that unpacked it finishes: the layer's two
    largest saved tensors."""
    sv, kept, shared, on_device = _hooked(model, layer, train, tokens, no_input_grad)
    device = sum(sv.size[n] for n in on_device)
    device_mlp = sum(sv.size[n] for n in on_device if sv.kept[n] == "mlp")

    def two_largest(group=None):
        return sum(sorted((sv.size[n] for n in kept if n not in shared and group in (None, sv.kept[n])),
                          reverse=True)[:2])

    # TRL's forward stash (the offloaded tensors within 5 ids of the newest) is counted only where a moment needs
    # it, from Saved.order: at DoRA's get_weight_norm (dora_norm_stash) and at the loss (loss_stash); counting
    # the 5 largest everywhere overstated the sampled peaks (tests/test_toolbox.py offload-all-nockpt: +7%)
    return device, two_largest(), two_largest("attn") - device_mlp


def dora_ids(sv: saved_set.Saved, train: TrainSpec) -> dict[int, tuple[tuple[bool, ...], tuple[bool, ...]]]:
    """Per index of Saved.order: the ids that a DoRA-adapted linear's saves outside Saved.order take before and after
    that save, each as whether TRL offloads it (a parameter or a tensor under min_offload_size stays: no eviction).
    PEFT's DoraLinearLayer.forward (peft/tuners/lora/dora.py 0.21) first builds the LoRA weight from an identity
    matrix (get_lora_weight: lora_B(lora_A(eye))) and its norm: eye (in x in), a weight, lora_A(eye) (in x r), an
    out-wide vector, a weight, 5 packs before lora_A's input is saved; lora_A's weight takes one after it; the
    magnitude scale (mag_norm_scale, 1 x out) one after each of the two products it multiplies. All in the adapter
    dtype. Read off the meta trace's pack order under OffloadActivationsModel (Phi-3 4-bit DoRA, draw 269 of seed
    88213; a tiny Phi-3, whose out-wide vectors stay under 1024 bytes)."""
    if not (train.dora and train.method == "lora"):
        return {}
    lb = DTYPES[train.lora_dtype]
    out: dict[int, tuple[tuple[bool, ...], tuple[bool, ...]]] = {}
    for (lin, *_), start in zip(sv.marks, sv.mark_starts):
        if not is_target(lin, train) or start >= len(sv.order):
            continue
        i, o = lin.in_features, lin.out_features
        vec = o * lb >= MIN_OFFLOAD_SIZE
        out[start] = ((i * i * lb >= MIN_OFFLOAD_SIZE, False, i * train.lora_r * lb >= MIN_OFFLOAD_SIZE, vec, False),
                      (False,))
        for j in range(start + 1, len(sv.order)):
            name = sv.order[j]
            if name in (f"{lin.name}.dora_lora", f"{lin.name}.dora_base"):
                out[j] = ((), (vec,))
            elif not name.startswith(lin.name + "."):
                break
    return out


def deduped(sv: saved_set.Saved, tokens: int, extra_ids: dict | None = None) -> set[str]:
    """The tensors a layer saves more than once whose later save finds the first still tracked, so TRL keeps that
    reference on the device (trl/models/activation_offloading.py pack_tensor: a storage key is tracked while its
    offloaded copy is in the forward stash, i.e. until a tensor offloaded max_fwd_stash_size ids later evicts it;
    a reference kept by that dedupe tracks the key until backward). A later save that comes after the first left
    the stash is offloaded again: a second host copy, nothing on the device. Every save in the layer's forward
    order (Saved.order) takes one id, and extra_ids (dora_ids) adds the saves DoRA makes outside it; other
    parameters' saves, which take ids too, are not in it, so a first copy counted as still stashed may already have
    left (never the other way)."""
    stash: dict[int, str] = {}  # id -> name of the offloaded copies still on the device
    tracked: dict[str, int | None] = {}  # name -> the stashed id holding its key (None: a kept reference)
    out = set()

    def offload(at: int) -> None:  # pack_tensor evicts what is max_fwd_stash_size ids older at each offload
        for old in [j for j in stash if j <= at - MAX_FWD_STASH]:
            if tracked.get(stash[old]) == old:
                del tracked[stash[old]]
            del stash[old]

    tid = -1

    def extra(offloads) -> None:
        nonlocal tid
        for offloaded in offloads:
            tid += 1
            if offloaded:
                offload(tid)

    for i, name in enumerate(sv.order):
        before, after = (extra_ids or {}).get(i, ((), ()))
        extra(before)
        tid += 1
        if name in tracked:
            out.add(name)
            tracked[name] = None
        elif sv.size[name] * tokens >= MIN_OFFLOAD_SIZE:
            offload(tid)
            stash[tid], tracked[name] = name, tid
        extra(after)
    return out & sv.shared


def stash_before(sv: saved_set.Saved, start: int, ids: int, exclude: set) -> int:
    """Per token: the offloaded copies TRL's forward stash still holds on the device from the `ids` saves before
    index `start` of the layer's forward order (before index 0: the previous layer's, the same order), less the
    names in `exclude` (alive anyway as locals) and storages saved twice (a dedupe's reference keeps them on the
    device already: split() counts them; a repeat makes no new copy). The stash holds the offloaded tensors whose
    id is within max_fwd_stash_size of the latest offloaded one (pack_tensor evicts at each offload); parameters'
    saves take ids but are not in Saved.order, so this can count one too many, never too few."""
    order, n = sv.order, len(sv.order)
    out = 0
    for j in range(start - ids, start):
        name = order[j % n]
        if name not in exclude and name not in order[:j % n] and name not in sv.shared:
            out += sv.size[name]
    return out


def dora_norm_stash(sv: saved_set.Saved, train: TrainSpec) -> tuple[int, ...]:
    """Per DoRA-adapted linear of a layer (sv.marks order): per token, what TRL's forward stash holds from before
    the linear at PEFT's get_weight_norm (peft/tuners/lora/dora.py DoraLinearLayer.forward). By then the linear has
    packed dropout's mask (when x needs a gradient), eye (lora_A's input in get_lora_weight), lora_B's weight (kept:
    a parameter, but an id) and lora_A(eye), so the stash keeps max_fwd_stash_size minus those of the saves before
    it. Its input, the branch's and the residual stream are locals anyway (dora.layer_linears counts them)."""
    out = []
    for (lin, x, _, group, *_rest), start in zip(sv.marks, sv.mark_starts):
        own = 3 + (1 if train.lora_dropout > 0 and sv.grad(x) else 0)
        siblings = {f"{m[0].name}.out" for m in sv.marks if m[1] == x}
        exclude = {x, "x", "h1", "norm1.out", "norm2.out"} | siblings
        out.append(stash_before(sv, start, MAX_FWD_STASH - own, exclude) if is_target(lin, train) else 0)
    return tuple(out)


@lru_cache(maxsize=4096)
def loss_stash(model: ModelSpec, train: TrainSpec) -> int:
    """Per token, --activation-offload all without checkpointing: what TRL's forward stash still holds from the last
    layer when the loss runs (lm_head's own saves sit in get_act_offloading_ctx_manager's NoOp scope). The final
    norm's last offloaded save ends the window: a 16-bit RMSNorm offloads its fp32 input (pow) and rsqrt's output,
    then dedupes both, so the last layer's last 3 saves stay; Liger's saves (x, weight, rstd) leave 2; a LayerNorm's
    five saves (input, weight, bias, mean, rstd) or an RMSNorm's trained weight's normalized input leave none."""
    if model.model_type in saved_set.LAYER_NORM_TYPES or (train.method == "full" and not train.liger):
        return 0
    from memplan.estimate.logits import final_softcap  # Gemma-2's tanh saves its output after lm_head: one more id

    sv = saved_set.layer_saved(model, model.layers[-1][1], saved_set.Ctx.of(train, model))
    # full fine-tuning: Liger's norm saves the same three whether its weight trains or not, and the last linear's
    # trained weight takes an id after its saved input (the meta trace at the fused loss: Qwen3 full, draw 34 of
    # seed 124871, -3.0% before)
    ids = MAX_FWD_STASH - (3 if train.liger else 2) - final_softcap(model) - (1 if train.method == "full" else 0)
    return stash_before(sv, len(sv.order), ids, set())


def device_host(model: ModelSpec, train: TrainSpec, layer_key: TrainSpec, stored: list[int], x_bytes: int):
    """The device / host split of what each layer keeps, under activation offloading.
    Checkpointing on (either mode): each checkpointed layer input goes to the host (torch's _NoopSaveInputs saves
    it under the offload hooks; everything else is saved through the checkpoint's own inner hooks). The first
    layer's input stays on the device anyway when the embedding is frozen: enable_input_require_grads makes that
    output a leaf that requires grad, which its AccumulateGrad node holds until backward. In backward each layer's
    input comes back as a new device copy (x_bytes). Checkpointing off (all): split. Returns per-layer device and
    host bytes and what one layer's backward brings back: (any layer, the first, any layer's attention, the
    first's attention)."""
    if train.gradient_checkpointing:
        leaf = train.method == "lora" and "embed_tokens" not in train.modules_to_save
        device = [x_bytes if (i == 0 and leaf) else 0 for i in range(len(stored))]
        return device, tuple(stored), (x_bytes,) * 4
    device, host, reload, first_back, attn, first_attn = [], [], 0, 0, 0, 0
    tokens = train.batch_size * train.seq_len
    input_grad = train.method == "full" or "embed_tokens" in train.modules_to_save
    for i, (n, layer) in enumerate(model.layers):
        total, _, x_kept = act.layer_totals(model, layer, layer_key)[:3]
        for first in ([True, False] if i == 0 else [False])[:n]:
            kept, back, back_attn = split(model, layer, layer_key, tokens, first and not input_grad)
            int8 = int8_held(model, layer, layer_key, tokens, first and not input_grad) if train.bits == 8 else 0
            m = 1 if first else n - (1 if i == 0 else 0)
            device += [kept + int8] * m
            host += [total + x_kept - kept] * m
            if first:
                first_back, first_attn = back, back_attn
            else:
                reload, attn = max(reload, back), max(attn, back_attn)
    if len(device) == 1:
        reload, attn = first_back, first_attn
    return device, tuple(host), (reload, first_back, attn, first_attn)


def eager_softmax_backward_held(model: ModelSpec, train: TrainSpec, e: int) -> int:
    """Per token, --activation-offload all without checkpointing, eager attention: what softmax's backward holds
    beyond moments.eager_softmax_backward. That figure has probs @ v's backward release the 16-bit
    probabilities it saved; offloaded, that backward (BmmBackward0) brings them back into TRL's bwd stash, where
    they stay until the next node that unpacks a tensor (SoftmaxBackward0, which brings back its fp32 result)
    finishes (trl/models/activation_offloading.py, unpack_tensor_with_streams: prev_node_ids are freed in the
    hook of the node after). fp32 activations: one fp32 tensor serves both saves (no cast), nothing more; Falcon's
    in-dtype softmax keeps its probabilities until softmax's backward ends anyway."""
    if (train.activation_offload != "all" or train.gradient_checkpointing or e == 4
            or effective_attention(model, train) != "eager" or softmax_in_dtype(model)):
        return 0
    return model.num_heads * train.seq_len * e
