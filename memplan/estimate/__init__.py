"""The analytic estimate: bytes per component and per phase of a training step, from the architecture alone.

    estimate(model, train) -> Estimate

Each component lives in its own module (weights, lora, optimizer, activations, logits, overhead) and cites its
source there. This module only composes them into the candidate peaks of each phase of a steady-state step —
the first step is the same but for the optimizer states, which its step() creates — and takes the maximum:

  load       weights + adapters, plus the largest tensor that is briefly held twice while loading
  forward    + optimizer states + everything saved for backward + the logits/loss spike, or the last layer's
             forward transients (bitsandbytes' dequantized weight among them)
  backward   + the loss gradient spike, or a layer's recomputed saved set and its gradient working set (first
             and last layer: saved activations shrink and gradients grow linearly in between)
  optimizer  + gradients + the optimizer's own temporaries
No torch import: this is the path `memplan estimate` runs, thousands of times a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

from memplan.errors import MemplanError
from memplan.estimate import activations as act_mod
from memplan.estimate import host as host_mod
from memplan.estimate import lora, offload, optimizer, weights
from memplan.estimate.logits import fused_loss, head_backward, loss_backward, loss_forward
from memplan.estimate import moments
from memplan.estimate.moments import final_norm_backward
from memplan.estimate.overhead import Overheads, default_overheads, replay_overheads
from memplan.spec import DTYPES, TRAIN_FIELDS, ModelSpec, TrainSpec
from memplan.stack import stack

PHASES = ("load", "forward", "backward", "optimizer")
COMPONENTS = ("weights_quantized", "quant_state", "weights_unquantized", "lora", "gradients", "optimizer_states",
              "activations", "logits_loss", "temporaries", "comm_buffers")

# Short provenance for each component; the module named holds the formula and its full citation.
SOURCES = {
    "weights_quantized": "bitsandbytes NF4/FP4 4 bit, LLM.int8 8 bit (weights.py)",
    "quant_state": "absmax per 64-block, double-quantized (QLoRA; weights.py)",
    "weights_unquantized": "embeddings, lm_head, norms, experts (weights.py)",
    "lora": "r·(in+out) per adapted linear (LoRA; lora.py)",
    "gradients": "one per trainable parameter (lora.py)",
    "optimizer_states": "per optimizer (optimizer.py)",
    "activations": "saved for backward, op by op (activations.py)",
    "logits_loss": "b·s·V logits, fp32 loss and gradient (logits.py)",
    "temporaries": "dequantized weight, grad working set (coefficients.json)",
    "comm_buffers": "unsharded params in flight, reduce-scatter input, DDP buckets (parallel.py)",
}


@dataclass
class Estimate:
    model: str
    params_total: int
    params_trainable: int
    config: dict
    components: dict[str, int]  # tensor bytes by component at the peak; they sum to peak_bytes
    phases: dict[str, int]  # tensor peak of each phase
    phase_components: dict[str, dict[str, int]]
    peak_bytes: int  # comparable to torch.cuda.max_memory_allocated
    peak_phase: str
    device_overheads: dict[str, int]  # CUDA context, cuBLAS workspace, caching allocator
    device_total_bytes: int  # comparable to nvidia-smi / NVML used memory
    overhead_source: str
    notes: list[str] = field(default_factory=list)
    host: dict = field(default_factory=dict)  # host RAM plan and host-link bytes (host.py)
    paging: dict | None = None  # paged optimizers: the device floor with the states evicted (host.py)
    # Multi-GPU (#13): every figure above is per rank; these say what the ranks share.
    host_bytes: int = 0  # host RAM per node for offloaded state (FSDP CPUOffload, ZeRO-Offload)
    parallel: dict = field(default_factory=dict)  # gpus, strategy, comm_bytes_per_step, ... ({} on one GPU)
    stack: dict = field(default_factory=dict)  # the library versions the figures describe (memplan/stack.py)

    def to_dict(self) -> dict:
        return {
            "per_rank": bool(self.parallel),
            "parallel": dict(self.parallel),
            "host_bytes": self.host_bytes,
            "model": self.model,
            "params": {"total": self.params_total, "trainable": self.params_trainable},
            "config": self.config,
            "components": dict(self.components),
            "peak_bytes": self.peak_bytes,
            "device_total_bytes": self.device_total_bytes,
            "peak_phase": self.peak_phase,
            "phases": dict(self.phases),
            "phase_components": {p: dict(c) for p, c in self.phase_components.items()},
            "device_overheads": dict(self.device_overheads),
            "overhead_source": self.overhead_source,
            "units": "bytes",
            "notes": list(self.notes),
            "host": dict(self.host),
            "paging": dict(self.paging) if self.paging else None,
            "stack": {**self.stack, "source": dict(self.stack.get("source", {}))},
        }


# A moment's live bytes are (total, base components, extras): most candidates lose to another of their phase, so
# the components dict is built (_components) only for each phase's peak.
_EXTRAS = ("gradients", "activations", "logits_loss", "temporaries", "comm_buffers")


def _base(components: dict[str, int]) -> tuple:
    """What every moment of a phase holds (weights, adapters, optimizer states), with its total."""
    return sum(components.values()), components


def _candidate(base: tuple, gradients: int = 0, activations: int = 0, logits_loss: int = 0, temporaries: int = 0,
               comm_buffers: int = 0) -> tuple:
    """One moment's live bytes: the base's plus these."""
    extra = (int(gradients), int(activations), int(logits_loss), int(temporaries), int(comm_buffers))
    return base[0] + sum(extra), base[1], extra


def _components(moment: tuple) -> dict[str, int]:
    """The moment's bytes by component, every component in COMPONENTS' order."""
    out = dict.fromkeys(COMPONENTS, 0)
    out.update(moment[1])
    for k, v in zip(_EXTRAS, moment[2]):
        out[k] += v
    return out


def _total(moment: tuple) -> int:
    return moment[0]


def _larger(a: tuple, b: tuple) -> tuple:
    """The moment with more bytes (the first on a tie, as max)."""
    return a if a[0] >= b[0] else b


# the attention's linears (the rest of a layer's parameters get their gradients in its MLP's backward, first)
ATTENTION_LINEARS = lora.ATTN | {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}


_SETTINGS: dict = {}  # (id(model), settings without the shape) -> (model, _Settings)
SETTINGS_LIMIT = 4096


@dataclass(frozen=True)
class _Settings:
    """What an estimate needs from the model and the training settings but not from the batch or the sequence
    length: fit, sweep, gpus and a dataset's steps vary only the shape, thousands of times over."""

    weights: dict
    trainable: dict
    states: int
    ends: dict  # lora.head_and_embedding_grads
    step_temporaries: int  # the optimizer step's, one GPU
    load_transient: int
    largest_trainable: int
    config: dict  # train.to_dict() with the shape left to fill in
    notes: tuple  # the notes that do not depend on the shape
    loss_per_token: tuple  # the standard loss's (forward, backward) bytes per token
    first_layer_adapters: int  # the first layer's adapter bytes (its backward makes their gradients)
    full_grads: tuple | None  # full fine-tuning: per layer, its weight gradients, down_proj's, its MLP's; the rest;
    # per layer, its experts' (trained 3-D experts); per plain-MLP layer, its down projection's
    per_seq_activations: bool  # activations.per_seq: the per-token figures depend on the sequence length
    rank: object  # parallel.RankView on several GPUs, else None (its activation_train holds the first shape)
    rank_step_temporaries: int  # the optimizer step's on that rank
    activations: dict = field(default_factory=dict, compare=False)  # (batch, seq_len or 0) -> Activations: the
    # per-token figures of the shapes seen, shared by every sequence length where they do not depend on it


# every training field but the shape's, read at once (a key built field by field is much of an estimate's time)
_SETTINGS_FIELDS = attrgetter(*(f for f in TRAIN_FIELDS if f not in ("seq_len", "batch_size")))


def _settings(model: ModelSpec, train: TrainSpec) -> _Settings:
    key = (id(model), _SETTINGS_FIELDS(train))
    hit = _SETTINGS.get(key)
    if hit is not None and hit[0] is model:  # the same object (an id is reused once its model is freed)
        return hit[1]
    shape_free = train.variant(seq_len=0, batch_size=0)
    w = weights.weights(model, train)
    tr = lora.trainable(model, train)
    full = None
    if train.method == "full":
        gb = 4 if train.bits == 32 else DTYPES[train.compute_dtype]
        layers = [layer for n, layer in model.layers for _ in range(n)]
        full = (tuple(layer.params * gb for layer in layers),
                tuple(next((lin.numel for lin in layer.linears if lin.name == "down_proj"), 0) * gb
                      for layer in layers),
                tuple((layer.params - sum(lin.numel for lin in layer.linears if lin.name in ATTENTION_LINEARS)) * gb
                      for layer in layers),
                model.other_params * gb, tuple(layer.expert_params * gb for layer in layers),
                tuple(next((lin.numel for lin in layer.linears if lin.name in ("dense_4h_to_h", "fc2")), 0) * gb
                      if layer.mlp == "plain" else 0 for layer in layers))
    states = optimizer.states(model, train, tr["params"], tr["bytes"])
    rank = None
    if train.strategy != "none" and not model.derived:  # one rank of a data-parallel job (parallel.py)
        from memplan.estimate import parallel

        rank = parallel.rank_view(model, train, w, tr, states)
    act = rank.activation_train if rank and rank.activation_train else train  # what the activations follow
    out = _Settings(
        weights=w, trainable=tr, states=states,
        ends=lora.head_and_embedding_grads(model, train),
        step_temporaries=optimizer.step_temporaries(train, tr["bytes"], model),
        load_transient=weights.load_transient(model, train), largest_trainable=_largest_trainable(model, train),
        config=shape_free.to_dict(), notes=tuple(_shape_free_notes(model, act)),
        loss_per_token=(loss_forward(model, act), loss_backward(model, act)),
        first_layer_adapters=lora.layer_adapter_bytes(model, train, model.layers[0][1]), full_grads=full,
        per_seq_activations=act_mod.per_seq(model, act), rank=rank,
        rank_step_temporaries=optimizer.step_temporaries(train, rank.gradients, model) if rank else 0)
    if len(_SETTINGS) >= SETTINGS_LIMIT:
        _SETTINGS.clear()
    _SETTINGS[key] = (model, out)
    return out


def estimate(model: ModelSpec, train: TrainSpec, overheads: Overheads | None = None) -> Estimate:
    if overheads is None or overheads is default_overheads():  # uncalibrated: the replay-fitted allocator figure
        overheads = replay_overheads(model.model_type)
    T = train.batch_size * train.seq_len
    fixed = _settings(model, train)
    w, tr, states = fixed.weights, fixed.trainable, fixed.states
    grads = tr["bytes"]
    lora_bytes = 0 if train.method == "full" else tr["bytes"]  # full: the weights are the trainables
    comm = dict.fromkeys(("load", "forward_loss", "forward_layer", "backward_loss", "backward_layer", "optimizer"), 0)
    rank = None
    act_train = train
    if train.strategy != "none":  # one rank of a data-parallel job (parallel.py)
        if model.derived:
            raise MemplanError(f"{model.name} is a derived architecture (fitted to single-GPU meta traces): its "
                               f"per-rank estimate is not modelled; `memplan trace {model.name} --gpus "
                               f"{train.gpus}` traces rank 0 exactly")
        rank = fixed.rank
        w, states, grads, lora_bytes, comm = rank.weights, rank.states, rank.gradients, rank.lora, rank.comm
        if rank.activation_train:  # at this shape
            act_train = rank.activation_train.variant(seq_len=train.seq_len, batch_size=train.batch_size)
    if model.derived:  # no hand-written activation formulas: terms fitted to meta traces (derived.py)
        from memplan.estimate import derived

        chosen, extra = derived.phase_components(model, train)
        return _finish(model, train, overheads, fixed, {p: {k: c.get(k, 0) for k in COMPONENTS}
                                                        for p, c in chosen.items()}, extra)
    shape = train.batch_size, train.seq_len if fixed.per_seq_activations else 0
    a = fixed.activations.get(shape)
    if a is None:
        a = fixed.activations[shape] = act_mod.activations(model, act_train)

    static = {**w, "lora": lora_bytes}
    steady = _base({**static, "optimizer_states": states})
    stored = sum(a.stored_per_layer) + a.fixed
    before_norm = stored - a.final_norm  # the final norm's (and a trained lm_head's) saved input: from the norm on
    # in the last layer's forward: what the layers before it saved, and its input (the residual stream)
    last_fwd = before_norm - a.stored_per_layer[-1] + a.layer_input
    # DoRA with dropout saves each adapted weight (absolute bytes per layer; see activations.dora_saved)
    dora = () if train.gradient_checkpointing or train.activation_offload != "off" else a.dora_saved
    dora_all, dora_but_last = (sum(dora), sum(dora[:-1])) if dora else (0, 0)

    if train.loss == "standard":
        loss_fwd, loss_bwd = T * fixed.loss_per_token[0], T * fixed.loss_per_token[1]
    else:
        loss_fwd, loss_bwd = fused_loss(model, act_train, T)
    stash = offload.loss_stash(model, act_train) if a.offloaded_layers else 0  # TRL's, at the loss
    # the loss runs after the base model's forward returned: its eager 4-D mask (forward_only) is gone
    fwd_loss = _candidate(steady, activations=T * (stored - a.forward_only + stash) + dora_all, logits_loss=loss_fwd,
                          comm_buffers=comm["forward_loss"])
    # offloaded: the embedding's output, saved by layer 0 to the host, stays the model forward's local
    # (`inputs_embeds` in LlamaModel.forward et al.) until the layers are done; not at the loss
    last_fwd += a.layer_input if a.offloaded_layers else 0
    fwd_layer = _candidate(steady, activations=T * last_fwd + dora_but_last,
                           # LLM.int8's forward multiplies int8 CA by int8 CB (MatMul8bitLt.forward,
                           # int8_mixed_scaled_mm: only outlier columns dequantized): no weight-sized copy
                           temporaries=T * a.fwd_transient + (a.dequant_bytes if train.bits != 8 else 0),
                           comm_buffers=comm["forward_layer"])
    bwd_loss = _candidate(steady, activations=T * (stored - a.forward_only) + dora_all, logits_loss=loss_bwd,
                          comm_buffers=comm["backward_loss"])
    forward = [fwd_loss, fwd_layer]
    if a.fwd_mlp_out:  # the last layer's MLP output linear, its LoRA add (moments.mlp_out_forward)
        forward.append(_candidate(steady, activations=T * before_norm, temporaries=T * a.fwd_mlp_out,
                                  comm_buffers=comm["forward_layer"]))
    if a.fwd_down[0]:  # the last layer's down_proj forward (moments.down_forward), beside what that layer keeps on
        # the device under offload all (TRL's dedupes: split)
        own = a.stored_per_layer[-1] if a.offloaded_layers else 0
        forward.append(_candidate(steady, activations=T * (last_fwd + own),
                                  temporaries=T * a.fwd_down[0] + a.fwd_down[1], comm_buffers=comm["forward_layer"]))
    if comm.get("forward_copy_out"):  # FSDP: the last layer's parameters being copied out (parallel.py)
        forward.append(_candidate(steady, activations=T * last_fwd + dora_but_last,
                                  comm_buffers=comm["forward_copy_out"]))
    if comm.get("forward_tail_copy_out"):  # the tail unit copies out in its pre-forward: before the final norm
        # runs (untied), or at the embedding, before any layer (tied: the tail holds the embedding)
        before_tail = a.fixed - a.final_norm if model.lm_head_params == 0 else before_norm
        forward.append(_candidate(steady, activations=T * before_tail + (0 if model.lm_head_params == 0 else dora_all),
                                  comm_buffers=comm["forward_tail_copy_out"]))
    if a.moe_tail:  # the last layer's experts combine their outputs (moments.moe_tail)
        forward.append(_candidate(steady, activations=T * before_norm + dora_but_last, temporaries=T * a.moe_tail,
                                  comm_buffers=comm["forward_layer"]))
    forward += _dora_forward(a, train, T, steady, before_norm + (a.layer_input if a.offloaded_layers else 0),
                             dora_but_last, comm["forward_layer"])

    frozen_plain = moments.frozen_plain_mlp_backward(model, train)  # per token; 0 unless it applies

    def layer_bwd(idx: int, done_grads: int, mul_grads: int = 0, mlp_grads: int = 0,
                  moment: tuple | None = None, own_grads: int = 0, act_grads: int = 0) -> tuple:
        """The peak of layer idx's backward; done_grads exist at its start, the gated product's backward adds
        mul_grads (down_proj's), the attention's backward comes after the whole MLP's (mlp_grads). moment: FSDP's
        buffers in flight during this layer's backward and at its post-backward reduce (parallel.py), own_grads the
        layer's unsharded gradients once its backward is done, act_grads a plain MLP's down projection's (made before
        its activation's backward)."""
        kept = T * (sum(a.stored_per_layer[: idx + 1]) + a.fixed - a.final_norm - a.forward_only)
        kept += sum(dora[: idx + 1]) if dora else 0
        recompute_reload = a.reload_first if idx == 0 else a.reload
        recompute = (a.layer_saved[idx] if train.gradient_checkpointing else 0) + recompute_reload
        recompute = T * recompute + (a.dora_saved[idx] if train.gradient_checkpointing and a.dora_saved else 0)
        in_flight = moment[0] if moment else comm["backward_layer"]
        if frozen_plain:  # checkpointed plain MLP, frozen bitsandbytes linears (keeping ctx.tensors, nothing to
            # unpack): the down projection's backward dequantizes before anything starts the recompute; the up
            # projection's after the activation's backward released the MLP's recomputed saved set; each beside the
            # residual stream's gradient and the i-wide gradient it takes or makes (MatMul4Bit / MatMul8bitLt)
            mlp_saved = T * (a.layer_saved[idx] - a.layer_saved_attn[idx])
            start = _larger(_candidate(steady, gradients=done_grads, activations=kept,
                                       temporaries=T * frozen_plain + a.dequant_bytes, comm_buffers=in_flight),
                            _candidate(steady, gradients=done_grads, activations=kept + recompute - mlp_saved,
                                       temporaries=T * frozen_plain + a.dequant_bytes, comm_buffers=in_flight))
        else:
            start = _candidate(steady, gradients=done_grads, activations=kept + recompute,
                               temporaries=T * a.bwd_work_mlp + (0 if a.dequant_work else a.dequant_bytes),
                               comm_buffers=in_flight)
        if a.dequant_work:  # the recompute's end holds no dequantized weight; the last linear's backward does
            start = _larger(start, _candidate(steady, gradients=done_grads, activations=kept + recompute,
                                              temporaries=T * a.dequant_work + a.dequant_bytes, comm_buffers=in_flight))
        # by the attention's backward the MLP's saved tensors are released, and those of the attention output
        # linear's adapter: fewer activations (what of them the device does not hold, under offloading, comes off
        # the working set)
        out_saved = a.attn_out_saved[idx] if a.attn_out_saved and (
            train.gradient_checkpointing or train.activation_offload == "off") else 0  # else on the host
        # (offloaded without checkpointing, the MLP's saved tensors were never on the device and those brought
        # back for its backward left TRL's bwd stash with it: nothing comes off)
        freed = 0 if a.offloaded_layers else T * (a.layer_saved[idx] - a.layer_saved_attn[idx] + out_saved)
        # offloaded: what the attention's own backward brings back, less the MLP's released part (offload.split)
        back = T * (a.reload_attn_first if idx == 0 else a.reload_attn) if a.offloaded_layers else recompute
        held = min(freed, kept + back)
        attn = _candidate(steady, gradients=done_grads + mlp_grads, activations=kept + back - held,
                          temporaries=T * a.bwd_work_attn - (freed - held) + a.dequant_bytes, comm_buffers=in_flight)
        start = _larger(start, attn)
        if a.bwd_work_act:  # no dequantized weight: a plain MLP's activation backward, a checkpointed MoE's experts
            start = _larger(start, _candidate(steady, gradients=done_grads + act_grads, activations=kept + recompute,
                                              temporaries=T * a.bwd_work_act, comm_buffers=in_flight))
        if a.bwd_work_softmax:  # eager attention's softmax backward (moments.eager_softmax_backward): no
            # dequantized weight (o_proj's backward is done, q/k/v's not begun)
            start = _larger(start, _candidate(steady, gradients=done_grads + mlp_grads,
                                              activations=kept + back - held,
                                              temporaries=T * a.bwd_work_softmax - (freed - held),
                                              comm_buffers=in_flight))
        # the first layer's own adapter gradients are made by its backward, after these moments
        own = fixed.first_layer_adapters if idx == 0 and rank is None else 0
        best = None  # each DoRA linear's backward (dora.py): its moments compared as sums, one candidate built
        for d in a.dora_layers[idx] if a.dora_layers else ():
            if train.gradient_checkpointing:  # the recomputed layer's set up to this linear
                here = kept + T * (d.through - d.layer_input + recompute_reload) + d.weight_before + d.weight
            elif train.activation_offload != "off":  # the layer's set is on the host, brought back node by node
                here = kept + T * recompute_reload
            else:  # the layer's set but what the ops after this linear saved (their backward ran)
                here = kept - T * d.after - (dora[idx] - d.weight_before - d.weight if dora else 0)
            moments = [(here, T * d.bwd)]
            if train.gradient_checkpointing:  # the recompute runs its forward again, its eye saved this time
                before = kept + T * (d.through - d.layer_input + recompute_reload) + d.weight_before
                moments += [(before, T * (d.fwd_norm + d.pre_grads) + d.norm_abs),
                            (before + d.weight, T * ((d.stop or d.fwd) + d.pre_grads) + d.held_abs)]
            for m in moments:
                if best is None or sum(m) > sum(best):
                    best = m
        if best is not None:
            start = _larger(start, _candidate(steady, gradients=done_grads - own, activations=best[0],
                                              temporaries=best[1], comm_buffers=in_flight))
        if a.recompute_lora_add:  # the recompute at an adapted linear's LoRA add (activations._recompute_lora_add)
            start = _larger(start, _candidate(steady, gradients=done_grads,
                                              activations=kept + T * (a.recompute_lora_add[idx] + recompute_reload),
                                              temporaries=T * a.bwd_work_h, comm_buffers=in_flight))
        reduce = moment[1] if moment else 0
        if reduce:  # FSDP's post-backward: the layer's gradients and their reduce-scatter input (parallel.py)
            released = 0 if train.gradient_checkpointing else T * a.stored_per_layer[idx]  # by its backward
            start = _larger(start, _candidate(steady, gradients=done_grads, activations=kept - released,
                                              comm_buffers=reduce))
            # just before it: every unsharded gradient of the layer made, nothing resharded, its input norm's
            # backward running (none in a layer 0 whose input needs no gradient: activations.first_input_frozen)
            norm = T * a.bwd_work_norm if idx or not act_mod.first_input_frozen(model, train) else 0
            start = _larger(start, _candidate(steady, gradients=done_grads + own_grads, activations=kept - released,
                                              temporaries=norm, comm_buffers=moment[0]))
        if a.experts_bwd and a.experts_bwd[idx][1]:  # trained experts' gate_up backward (experts.backward_moment)
            freed, work = a.experts_bwd[idx]
            start = _larger(start, _candidate(steady, gradients=done_grads + fixed.full_grads[4][idx],
                                              activations=kept + recompute - T * freed, temporaries=T * work,
                                              comm_buffers=in_flight))
        if not a.mlp_mul_work[idx]:
            return start
        mul = _candidate(steady, gradients=done_grads + mul_grads,
                         activations=kept + recompute - T * a.mlp_mul_freed[idx],
                         temporaries=T * a.mlp_mul_work[idx], comm_buffers=in_flight)
        return _larger(start, mul)

    # a trained output layer's gradient exists from the loss's backward on, a trained embedding's only after the
    # layers' (lora.head_and_embedding_grads); multi-GPU ranks keep the sharded total (parallel.py)
    # (DDP: every rank holds whole gradients as one GPU does, its buckets beside them)
    replicated = rank is None or train.strategy == "ddp"
    ends = fixed.ends if replicated else {"head": 0, "embed": 0, "tied": False}
    if train.method == "full" and replicated:  # a layer's weight gradients appear during its own backward:
        # at its start only the later layers', the head's and the final norm's exist; at the gated MLP's product
        # backward, down_proj's too
        per_layer, down, mlp, others, _, plain_down = fixed.full_grads
        done = ends["head"] + others
        bwd_last = layer_bwd(len(per_layer) - 1, done, down[-1], mlp[-1], act_grads=plain_down[-1])
        bwd_first = layer_bwd(0, done + sum(per_layer[1:]), down[0], mlp[0], act_grads=plain_down[0])
    elif rank is not None and rank.layer_moments:  # FSDP: each layer's unsharded gradients appear during its own
        # backward (full fine-tuning: down_proj's at the gated product, the MLP's by the attention), beside the
        # shards of the layers after it and the buffers in flight at that layer (parallel._fsdp_layer_moments)
        own = fixed.full_grads
        backward = [bwd_loss] + [layer_bwd(i, done, own[1][i] if own else 0, own[2][i] if own else 0, (fl, red),
                                           own[0][i] if own else 0)
                                 for i, (fl, red, done) in rank.layer_moments.items()]
    elif rank is not None:
        bwd_last = layer_bwd(len(a.stored_per_layer) - 1, 0)
        bwd_first = layer_bwd(0, grads)
    else:
        bwd_last = layer_bwd(len(a.stored_per_layer) - 1, ends["head"])
        bwd_first = layer_bwd(0, grads - (0 if ends["tied"] else ends["embed"]))
    if rank is None or not rank.layer_moments:
        backward = [bwd_loss, bwd_last, bwd_first]
    if ends["head"] and train.loss == "standard":  # the trained head's MmBackward0 (logits.head_backward)
        backward.append(_candidate(steady, gradients=ends["head"], activations=T * (stored - a.forward_only) + dora_all,
                                   logits_loss=T * head_backward(model, act_train), comm_buffers=comm["backward_loss"]))
    if train.loss != "standard":  # the final norm's backward (moments.final_norm_backward)
        backward.append(_candidate(steady, gradients=ends["head"], activations=T * (stored - a.forward_only) + dora_all,
                                   temporaries=T * final_norm_backward(model, act_train),
                                   comm_buffers=comm["backward_loss"]))
    if ends["embed"]:  # EmbeddingBackward0: every gradient but the embedding's done, its own being made; tied:
        # the head's gradient waiting beside it, then their sum (3 V x H at once, one counted in grads)
        backward.append(_candidate(steady, gradients=grads,  # LLM.int8's inputs outlive the layers' backward
                                   activations=T * (a.fixed - a.final_norm - a.forward_only + a.int8_graph),
                                   temporaries=2 * ends["head"] if ends["tied"] else 0,
                                   comm_buffers=comm["backward_layer"]))
    if rank is not None and rank.gradients_embedding is not None:
        unsharded = fixed.ends  # FSDP: made whole, then reduce-scattered
        if unsharded["embed"]:  # the embedding's backward, as above: tied, 3 V x H at once
            backward.append(_candidate(steady, gradients=rank.gradients_embedding,
                                       activations=T * (a.fixed - a.final_norm - a.forward_only),
                                       temporaries=(3 if unsharded["tied"] else 1) * unsharded["embed"],
                                       comm_buffers=comm["backward_embedding"]))
    step_tmp = fixed.step_temporaries if rank is None else fixed.rank_step_temporaries
    opt_step = _candidate(steady, gradients=grads, temporaries=step_tmp, comm_buffers=comm["optimizer"])
    # multi-GPU: the load phase is the rank's shards after wrapping (how each launcher loads differs)
    load = _candidate(_base(static), temporaries=0 if rank else fixed.load_transient, comm_buffers=comm["load"])

    candidates = {"load": [load], "forward": forward, "backward": backward,
                  "optimizer": [opt_step]}
    chosen = {p: _components(max(cs, key=_total)) for p, cs in candidates.items()}
    host = host_mod.host_plan(model, act_train, a, states, T)
    return _finish(model, train, overheads, fixed, chosen, [], host, states, rank, act_train)


def _dora_forward(a, train: TrainSpec, T: int, steady: tuple, stored: int, dora_but_last: int,
                  in_flight: int) -> list[tuple]:
    """The last layer's DoRA linears in forward (dora.py): at get_weight_norm (weight-sized work) and at the
    adapter sum (output-sized products), on top of what the layers saved so far. Under checkpointing only the
    layer inputs are kept and the linear's own tensors are locals."""
    moments = []  # (activations, temporaries) per moment; one candidate built for the largest
    for d in a.dora_layers[-1] if a.dora_layers else ():
        if train.gradient_checkpointing:
            moments += [(T * stored, T * d.ckpt_norm + d.ckpt_norm_abs),
                        (T * stored, T * d.ckpt_fwd + d.ckpt_held_abs + d.weight)]
        elif train.activation_offload != "off":  # what the layers save streams to the host; the device keeps
            # their kept part (activations._offloaded) and the linear's transients
            moments += [(T * stored, T * d.offload_norm + d.norm_abs), (T * stored, T * d.offload_fwd + d.held_abs)]
        else:
            before = T * (stored - a.stored_per_layer[-1]) + dora_but_last + d.weight_before
            moments += [(before + T * d.through, T * d.fwd_norm + d.norm_abs),
                        (before + T * d.through + d.weight, T * d.fwd + d.held_abs)]
    if not moments:
        return []
    act, tmp = max(moments, key=sum)
    return [_candidate(steady, activations=act, temporaries=tmp, comm_buffers=in_flight)]


def _finish(model, train, overheads, fixed: _Settings, chosen: dict, extra_notes: list, host: dict | None = None,
            states: int = 0, rank=None, act_train: TrainSpec | None = None) -> Estimate:
    """The Estimate of the chosen candidate per phase (every component, in COMPONENTS' order): the peak is the
    largest phase."""
    tr = fixed.trainable
    phase_components = chosen
    phases = {p: sum(c.values()) for p, c in phase_components.items()}
    peak_phase = max(PHASES, key=lambda p: phases[p])
    peak = phases[peak_phase]
    device = overheads.device_bytes(peak)
    per_param = fixed.states / max(tr["params"], 1)
    paged = host_mod.paging(train, phase_components, states, per_param, fixed.largest_trainable)
    if paged:
        paged["floor_device_total_bytes"] = paged["floor_bytes"] + sum(overheads.device_bytes(paged["floor_bytes"])
                                                                       .values())
    par = {}
    if rank is not None:
        from memplan.estimate.parallel import nccl_bytes

        if train.gpus > 1:
            device["nccl_buffers"] = nccl_bytes()
        extra_notes = extra_notes + rank.notes
        par = {"gpus": train.gpus, "strategy": train.strategy, "fsdp_version": train.fsdp_version,
               "offload": train.offload, "quant_storage": train.storage,
               "comm_bytes_per_step": rank.comm_bytes_per_step, "host_bytes_per_node": rank.host_bytes,
               "ranks": "rank 0, the largest: shards are padded to equal size, but optimizer states follow each "
                        "rank's unpadded chunk (torch.chunk), smaller on the last ranks when a dimension does not "
                        "divide (FSDP); DDP ranks are identical"}
        if host is not None:  # one node: each rank's offloaded activations and paged states, and the offloaded state
            host = host_mod.per_node(host, train.gpus, rank.host_bytes)
    config = dict(fixed.config, seq_len=train.seq_len, batch_size=train.batch_size)  # train.to_dict()
    note_list = list(fixed.notes) + _shape_notes(model, act_train or train)
    return Estimate(
        model=model.name, params_total=model.total_params, params_trainable=tr["params"], config=config,
        components=phase_components[peak_phase], phases=phases, phase_components=phase_components, peak_bytes=peak,
        peak_phase=peak_phase, device_overheads=device, device_total_bytes=peak + sum(device.values()),
        overhead_source=overheads.source, notes=note_list + extra_notes, host=host or {},
        paging=paged, stack=stack(train.transformers), host_bytes=rank.host_bytes if rank else 0, parallel=par,
    )


def _largest_trainable(model: ModelSpec, train: TrainSpec) -> int:
    """Elements of the largest trainable tensor: the one whose optimizer states a paged step needs at once."""
    if train.method == "full":
        return host_mod._largest_param(model)
    sizes = [train.lora_r * max(lin.in_features, lin.out_features) for _, lin in lora.targeted(model, train)]
    if train.modules_to_save:
        sizes.append(model.vocab_size * model.hidden_size)
    return max(sizes, default=0)


def _shape_notes(model: ModelSpec, train: TrainSpec) -> list[str]:
    """The notes that depend on the sequence length."""
    out = []
    if train.transformers == 4 and train.attention == "sdpa" and act_mod.sdpa_gets_a_mask(model, train.seq_len, 4):
        out.append("transformers 4.57: a batch without attention_mask gets a packed-sequence check that always "
                   "builds a b·s² boolean mask, so SDPA runs the memory-efficient kernel with an explicit mask")
    positions = model.hf_config.get("max_position_embeddings")
    if positions and train.seq_len > positions and not _rope_covers(model, train.seq_len):
        out.append(f"seq-len {train.seq_len:,} is beyond {model.name}'s max_position_embeddings ({positions:,}) "
                   "and no rope_scaling in its config extends it: memory is estimated, but the model was not "
                   "trained on such positions (quality degrades; add RoPE scaling, e.g. YaRN / linear, to train)")
    return out


def _shape_free_notes(model: ModelSpec, train: TrainSpec) -> list[str]:
    out = list(model.notes)  # how the config was read (hfconfig.py) and which parts were derived
    if train.upcast_applies:
        out.append("prepare_model_for_kbit_training casts non-quantized weights to fp32, so the residual stream, "
                   "every layer output and the logits are fp32 (4 B/element); --upcast off keeps them 16-bit")
    moe = any(layer.expert_params for _, layer in model.layers)
    if moe and train.transformers == 4:
        out.append("transformers 4 builds MoE experts and the router as nn.Linear modules: bitsandbytes quantizes "
                   "them and all-linear LoRA adapts them (under transformers 5 they are 3-D parameters, unquantized)")
    elif moe and train.quantized:
        out.append("transformers 5 stores MoE experts as 3-D parameters: bitsandbytes does not quantize them "
                   "(bitsandbytes issue #1849) and LoRA does not adapt them; --transformers 4 models the 4.x "
                   "nn.Linear experts")
    if (train.quantized and train.transformers == 5
            and any(not lin.quantizable for _, layer in model.layers for lin in layer.linears)):
        out.append(f"{model.model_type}'s linears subclass nn.Linear, which transformers' bitsandbytes integration "
                   "leaves unquantized")
    ran = act_mod.effective_attention(model, train)
    if ran != train.attention:
        why = ("transformers implements its logit soft-capping only in eager attention" if ran == "eager" else
               "its one-head multi-query k/v make torch's fused SDPA kernels fall back to the math kernel")
        out.append(f"{model.model_type}: {why}, so attention keeps b·a·s² scores (O(s²) memory)")
    if train.optimizer.startswith("paged"):
        out.append("paged optimizer states live in CUDA managed memory: counted on the GPU at the peak, evictable "
                   "to host RAM under pressure (see 'paging' for the device floor with them evicted)")
    if train.attention == "flash_attention_2":
        out.append("flash_attention_2: no mask, sliding windows and soft-capping inside the kernel, GQA without "
                   "repeat_kv; saved: q, k, v (cast to the compute dtype when the stream is fp32), the output and a "
                   "fp32 log-sum-exp per head and token (flash_attn_interface.py, flash_api.cpp)")
    if train.activation_offload != "off":
        out.append(_offload_note(train))
    if any(layer.mlp == "moe" for _, layer in model.layers):
        out.append("MoE activations assume balanced routing (b*s*top_k token-slots)")
    return out


def _offload_note(train: TrainSpec) -> str:
    if train.activation_offload == "checkpoints":
        return ("activation offload checkpoints (transformers activation_checkpointing_enable(offload=True)): each "
                "checkpointed layer input goes to pinned host RAM; the device keeps the layer in flight (its input, "
                "brought back as a new copy while it recomputes) and the frozen embedding's output (a leaf that "
                "requires grad). Unsloth's \"unsloth\" checkpointing does the same with a non_blocking copy per "
                "layer; axolotl's activation_offloading: legacy is this, true is TRL's OffloadActivations (--activation-offload all)")
    how = ("with checkpointing: the checkpointed inputs and the tensors saved after the last layer go to the host"
           if train.gradient_checkpointing else
           "every saved tensor of >= 1024 B but the output head's goes to the host; a storage saved twice while "
           "its first copy is in flight (RMSNorm's fp32 input) stays on the device by TRL's dedupe")
    return (f"activation offload all (TRL OffloadActivations, get_act_offloading_ctx_manager defaults): {how}; "
            "the 5 most recent offloaded tensors stay on the device while they stream out (forward stash), and "
            "a tensor brought back lives until the next autograd node finishes")


def _rope_covers(model: ModelSpec, seq_len: int) -> bool:
    """True when the config's rope_scaling (or rope_parameters in transformers 5) extends the trained positions to
    seq_len: factor x original_max_position_embeddings (linear, dynamic, yarn, longrope, llama3)."""
    cfg = model.hf_config
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        return False
    kind = rope.get("rope_type") or rope.get("type")
    if not kind or kind == "default":
        return False
    factor = float(rope.get("factor") or 1.0)
    original = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") \
        or cfg.get("max_position_embeddings") or 0
    return factor > 1.0 and seq_len <= factor * original
