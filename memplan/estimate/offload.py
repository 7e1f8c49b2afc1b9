"""Activation offloading's device / host split of what each layer keeps (--activation-offload all|checkpoints).

The rules come from the code that runs: TRL's OffloadActivations (trl/models/activation_offloading.py) and
torch.autograd.graph.save_on_cpu around transformers' checkpoint function; memplan/trace/offload.py runs them on
the meta trace. activations.activations() calls device_host(); the per-layer saved set is activations'.
"""
from __future__ import annotations

from functools import lru_cache

from memplan.estimate import activations as act
from memplan.estimate.attention import effective_attention, softmax_in_dtype
from memplan.estimate.lora import is_target
from memplan.spec import LayerSpec, ModelSpec, TrainSpec

_QK = {"q_proj", "k_proj", "qkv_proj", "query_key_value"}  # linears whose LoRA makes the attention scores need a grad
_V = {"v_proj", "qkv_proj", "query_key_value"}


@lru_cache(maxsize=4096)
def _hooked(model: ModelSpec, layer: LayerSpec, train: TrainSpec, tokens: int, no_input_grad: bool):
    """The layer's saved set as TRL's hooks see it: (the Saved walk, the names saved, those saved twice, those the
    hooks leave on the device: saved a second time, or under min_offload_size)."""
    sv = act.layer_saved(model, layer, act.Ctx.of(train, model))
    kept = [n for n in sv.kept if n != "x" or sv.kept.get("x")]
    shared = set(sv.shared)
    if no_input_grad:  # the first layer, its input a frozen embedding's output (no checkpointing: nothing calls
        # enable_input_require_grads): an op whose inputs need no gradient saves nothing, so the input norm saves
        # once or not at all; softmax saves its result only if q or k is adapted (the scores need a gradient),
        # probs @ v's bmm saves the probabilities only if v is (derivatives.yaml, bmm: self for mat2's grad)
        shared -= {"x", "norm1.x32"}
        adapted = {lin.name for lin in layer.linears if is_target(lin, train)}
        if not (adapted & _QK and adapted & _V):
            shared -= {"probs", "probs.fp32"}
    on_device = [n for n in kept if n in shared or sv.size[n] * tokens < 1024]
    return sv, kept, shared, on_device


@lru_cache(maxsize=4096)
def int8_held(model: ModelSpec, layer: LayerSpec, train: TrainSpec, tokens: int, no_input_grad: bool) -> int:
    """Per token, --activation-offload all without checkpointing: the LLM.int8 inputs on the device beyond what
    TRL's hooks leave there (split). bitsandbytes' MatMul8bitLt.forward keeps its input as `ctx.tensors = (CAt,
    subA, A)`, a plain attribute, not save_for_backward (autograd/_functions.py 0.50), whenever the input or the
    weight needs a gradient: the hooks never see it, so it stays on the device as long as the graph, whatever else
    saves (and offloads) it; a storage the hooks also keep on the device counts once. Layer 0 with a frozen
    embedding (no_input_grad): only the inputs that need a gradient (activations._linear)."""
    sv = act.layer_saved(model, layer, act._ctx(model, train, no_input_grad))
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
    Kept: a storage saved a second time while its first copy is in flight (TRL's storage-key dedupe keeps that
    reference on the device until backward) and tensors under min_offload_size (1024 B). Brought back: a tensor
    lives until the autograd node after the one that unpacked it finishes: the layer's two largest saved tensors."""
    sv, kept, shared, on_device = _hooked(model, layer, train, tokens, no_input_grad)
    device = sum(sv.size[n] for n in on_device)
    device_mlp = sum(sv.size[n] for n in on_device if sv.kept[n] == "mlp")

    def two_largest(group=None):
        return sum(sorted((sv.size[n] for n in kept if n not in shared and group in (None, sv.kept[n])),
                          reverse=True)[:2])

    # TRL's forward stash (its 5 newest packs stay on the device while they stream out) is left out: its window
    # counts every pack, parameters and kept references too, which this per-layer saved set does not order;
    # counting 5 offloaded tensors overstated the sampled peaks (tests/test_toolbox.py offload-all-nockpt: +7%)
    return device, two_largest(), two_largest("attn") - device_mlp


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
