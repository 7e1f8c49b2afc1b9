"""Data parallelism: what one rank of N holds (DDP, FSDP FULL_SHARD / SHARD_GRAD_OP, DeepSpeed ZeRO 1/2/3, CPU
offload): rank 0's, the largest. FSDP2 pads each parameter's and gradient's shard to ceil(dim0 / N) rows on every
rank, but the optimizer makes its states from the rank's unpadded chunk (torch.chunk: the last ranks' are smaller
when dim0 does not divide), so the last ranks can hold slightly less (checked on fake ranks 0..N-1); every rank
runs its own micro-batch (batch_size is per rank).

    rank_view(model, train, weights, trainable, states) -> RankView

Sources, per strategy:
- ddp: torch DistributedDataParallel (torch/nn/parallel/distributed.py, csrc/distributed/c10d/reducer.cpp):
  everything replicated; the Reducer allocates flat gradient buckets covering every trainable parameter
  (bucket_cap_mb=25, first bucket 1 MiB; gradient_as_bucket_view=False by default, so the buckets are a second
  copy of the gradients) when it is built, and rebuilds them after the first step. Traced (memplan.trace.distributed).
- fsdp / fsdp-grad-op, FSDP2 (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, _fsdp_collectives.py), wrapped as
  accelerate does (each decoder layer, the input embeddings, the tail [final norm, lm_head] kept unsharded from
  its forward to the end of backward, the root): every parameter is sharded on dim 0, each shard padded to
  ceil(dim0 / N) rows; an all-gather allocates the unit's full padded parameters plus, while copying out, the
  flat all-gather buffer (2x the unit); backward reduce-scatters each unit's gradients through a full-size
  input. fsdp-grad-op (SHARD_GRAD_OP, reshard_after_forward=False) keeps every unit unsharded from its forward
  to its backward. bitsandbytes 4-bit weights stored as uint8 stay whole on every rank (accelerate passes them
  as ignored_params). The quantization state is a module attribute, never sharded. Traced.
  FSDP1 (FlatParameter per unit, torch/distributed/fsdp/_flat_param.py) holds the same shard bytes up to
  padding (one flat pad per unit instead of per parameter) and all-gathers a unit's FlatParameter: estimated
  with the same terms, not traced.
- zero1 / zero2 / zero3: DeepSpeed's mixed-precision recipe (Rajbhandari et al. 2020, "ZeRO", Table 1; the
  implementation's own estimators, deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs
  and stage3.py estimate_zero3_model_states_mem_needs): per trainable parameter 2 B 16-bit weight, 2 B 16-bit
  gradient, and 16 B fp32 master weight + fp32 gradient + Adam moments ("18 = 2 grads16 + 4 grads32 + 4 params32
  + 8 optimizer states" with the 16-bit weight apart); stage 1 shards the fp32 part, stage 2 also the 16-bit
  gradients, stage 3 also the weights. DeepSpeed's bf16 engine casts the whole module to the compute dtype, so
  PEFT's fp32 adapters and prepare_model_for_kbit_training's fp32 upcast do not survive: activations are
  16-bit. Buffers: contiguous-gradients reduce bucket (reduce_bucket_size 5e8 elements, capped here at the
  trainable count), ZeRO-3's prefetch bucket (stage3_prefetch_bucket_size 5e7 elements) on top of the layer
  being computed, and parameters under stage3_param_persistence_threshold (1e5 elements) kept whole
  (deepspeed/runtime/zero/config.py defaults). Not traced (the engine needs an accelerator).
- offload: FSDP CPUOffload(offload_params=True) keeps parameters, gradients and the optimizer step on the host;
  ZeRO-Offload (offload_optimizer) moves the fp32 master weights, fp32 gradients and optimizer states to the
  host, and ZeRO-3 offload_param also the 16-bit weight shards. Host RAM per node counts every rank's shard
  (one node of `gpus` GPUs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from memplan.estimate.lora import targeted
from memplan.spec import DTYPES, ModelSpec, TrainSpec

ZERO_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed reduce_bucket_size default
ZERO3_PREFETCH = 50_000_000  # elements: stage3_prefetch_bucket_size default
ZERO3_PERSIST = 100_000  # elements: stage3_param_persistence_threshold default
_STORAGE_BYTES = {"uint8": 1, "bf16": 2, "fp16": 2, "fp32": 4}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class RankView:
    """Per-rank replacement of the single-GPU static terms, and the buffers in flight per moment."""

    weights: dict[str, int]  # weights_quantized, quant_state, weights_unquantized (this rank)
    lora: int  # trainable parameters this rank holds (0 for full fine-tuning: they are the weights)
    gradients: int  # persistent gradients after backward (this rank)
    states: int  # optimizer states on the GPU (this rank)
    comm: dict[str, int]  # buffers in flight: load, forward_loss, forward_layer, backward_loss, backward_layer,
    # backward_first_layer (optional; else backward_layer), optimizer
    host_bytes: int  # host RAM per node for offloaded state
    comm_bytes_per_step: int  # bytes each rank sends per step (ring collectives)
    activation_train: TrainSpec | None = None  # the spec activations follow (ZeRO: 16-bit, no upcast)
    # FSDP: {layer index: (in flight during its backward, at its post-backward reduce, gradient shards done)}
    layer_moments: dict = field(default_factory=dict)
    gradients_embedding: int | None = None  # FSDP: gradient shards done when the embedding's backward runs
    notes: list[str] = field(default_factory=list)


def _params(model: ModelSpec, train: TrainSpec):
    """(unit, count, dim0, rest, elem_bytes, kind) for every parameter tensor as it sits while training. unit is
    'layer{i}' (a layer group), 'embed' or 'tail'; kind is q (4/8-bit), u (unquantized), t (trainable)."""
    from memplan.estimate.weights import unquantized_dtype_bytes

    ub = unquantized_dtype_bytes(train)
    if train.method == "full":
        ub = 4 if train.bits == 32 else DTYPES[train.compute_dtype]
    sb = _STORAGE_BYTES[train.storage]
    lb = DTYPES[train.lora_dtype]
    full = train.method == "full"
    wk = "t" if full else "u"
    out = []
    h = model.hidden_size
    targets = {id(lin) for _, lin in targeted(model, train)}
    for i, (n, layer) in enumerate(model.layers):
        unit = f"layer{i}"
        for lin in layer.linears:
            if train.quantized and lin.quantizable:
                packed = _ceil(lin.weight_numel, 2) if train.bits == 4 else lin.weight_numel
                out.append((unit, n, _ceil(packed, sb) if train.bits == 4 else lin.out_features,
                            1 if train.bits == 4 else lin.in_features, sb if train.bits == 4 else 1, "q"))
            else:
                out.append((unit, n, lin.out_features, lin.in_features, ub, wk))
            if lin.bias:
                out.append((unit, n, lin.out_features, 1, ub, wk))
            if id(lin) in targets:
                out.append((unit, n, train.lora_r, lin.in_features, lb, "t"))
                out.append((unit, n, lin.out_features, train.lora_r, lb, "t"))
                if train.dora:
                    out.append((unit, n, lin.out_features, 1, lb, "t"))
        if layer.norm_params:
            out.append((unit, n, layer.norm_params, 1, ub, wk))  # a few 1-D tensors of hidden size
        if layer.expert_params:
            e = max(layer.num_experts, 1)
            gate_up, down = 2 * layer.expert_intermediate * h, layer.expert_intermediate * h
            if layer.expert_params == e * (gate_up + down):  # transformers 5: gate_up_proj and down_proj, 3-D
                out += [(unit, n, e, gate_up, ub, wk), (unit, n, e, down, ub, wk)]
            else:
                out.append((unit, n, e, layer.expert_params // e, ub, wk))
        if layer.router_params:
            out.append((unit, n, max(layer.num_experts, 1), layer.router_params // max(layer.num_experts, 1), ub, wk))
    out.append(("embed", 1, model.embedding_params // h, h, ub, wk))
    if model.lm_head_params:
        out.append(("tail", 1, model.lm_head_params // h, h, ub, wk))
    if model.other_params:
        out.append(("tail", 1, model.other_params, 1, ub, wk))
    for lin in model.other_linears:
        out.append(("tail", 1, lin.out_features, lin.in_features, ub, wk))
    for name in train.modules_to_save:
        rows = model.vocab_size
        out.append(("tail" if name in ("lm_head", "embed_out") else "embed", 1, rows, h, ub, "t"))
    return out


def rank_view(model: ModelSpec, train: TrainSpec, w: dict[str, int], trainable: dict, states: int) -> RankView:
    s = train.strategy
    if s == "ddp":
        return _ddp(model, train, w, trainable, states)
    if s in ("fsdp", "fsdp-grad-op"):
        return _fsdp(model, train, w, trainable, states)
    return _zero(model, train, w, trainable, states)


def _ring(n: int, nbytes: int) -> int:
    """Bytes one rank sends in a ring all-gather or reduce-scatter of nbytes in all (NCCL ring algorithm)."""
    return (n - 1) * nbytes // n


DDP_BROADCAST_BUCKET = 250 * 1024 * 1024  # torch DistributedDataParallel.broadcast_bucket_size


def _broadcast_in_flight(model, train) -> int:
    """Bytes of the two largest consecutive broadcast buckets DDP's constructor has in flight (see _ddp)."""
    params = _params(model, train)
    ordered = [p for p in params if p[0] == "embed"]
    for unit in dict.fromkeys(p[0] for p in params if p[0].startswith("layer")):
        group = [p for p in params if p[0] == unit]
        ordered += group * group[0][1]  # cnt identical layers, each in its own order
    ordered += [p for p in params if p[0] == "tail"]
    open_buckets: dict = {}  # (element bytes, quantized) -> (bytes, tensors): one open bucket per dtype
    flushed = []
    for _, _, d0, rest, eb, kind in ordered:
        q, nbytes = kind == "q", d0 * rest * eb
        size, count = open_buckets.get((eb, q), (0, 0))
        open_buckets[(eb, q)] = (size + nbytes, count + 1)
        if size + nbytes >= DDP_BROADCAST_BUCKET:
            flushed.append(open_buckets.pop((eb, q)))
    # a bucket of one tensor is flattened as a view of it (tensor_flatten.cpp flatten_dense_tensors): no buffer
    flushed = [size if count > 1 else 0 for size, count in flushed + list(open_buckets.values())]
    return max((a + b for a, b in zip(flushed, flushed[1:])), default=sum(flushed))


def _ddp(model, train, w, trainable, states) -> RankView:
    g = trainable["bytes"]
    buckets = g  # flat buckets cover every trainable parameter (reducer.cpp initialize_buckets)
    comm = dict.fromkeys(("load", "forward_loss", "forward_layer", "backward_loss", "backward_layer",
                          "optimizer"), buckets)
    # DDP's constructor broadcasts rank 0's module states (_sync_module_states -> broadcast_coalesced): tensors
    # are taken in module order into one bucket per dtype, closed once it reaches 250 MiB
    # (csrc/utils/tensor_flatten.cpp take_tensors), each flattened into a new buffer, and two buckets are in
    # flight at once (c10d comm.cpp broadcast_coalesced issues the next before finishing the previous)
    comm["load"] = buckets + _broadcast_in_flight(model, train)
    return RankView(weights=dict(w), lora=0 if train.method == "full" else g, gradients=g, states=states,
                    comm=comm, host_bytes=0, comm_bytes_per_step=2 * _ring(train.gpus, g))


def _shard_sum(params, n: int, pred) -> int:
    return sum(cnt * _ceil(d0, n) * rest * eb for _, cnt, d0, rest, eb, kind in params if pred(kind))


def _fsdp(model, train, w, trainable, states) -> RankView:
    n = train.gpus
    params = _params(model, train)
    q_whole = train.bits == 4 and train.storage == "uint8"  # accelerate leaves them out of sharding
    shard_q = _shard_sum(params, n, lambda k: k == "q")
    weights = {"weights_quantized": w["weights_quantized"] if q_whole else shard_q, "quant_state": w["quant_state"],
               "weights_unquantized": _shard_sum(params, n, lambda k: k == "u" or (k == "t" and train.method == "full"))}
    shard_t = _shard_sum(params, n, lambda k: k == "t")
    frac = shard_t / max(trainable["bytes"], 1)

    def unit_bytes(unit, kinds="qut"):  # unsharded, padded: n x the shard, per tensor of one layer of the group
        return sum(n * _ceil(d0, n) * rest * eb for u, cnt, d0, rest, eb, k in params
                   if u == unit and k in kinds and not (k == "q" and q_whole))

    def unit_total(unit, kinds="qut"):  # every layer of the group
        return sum(cnt * n * _ceil(d0, n) * rest * eb for u, cnt, d0, rest, eb, k in params
                   if u == unit and k in kinds and not (k == "q" and q_whole))

    layer_units = [f"layer{i}" for i in range(len(model.layers))]
    big_layer = max(unit_bytes(u) for u in layer_units)
    big_layer_grads = max(unit_bytes(u, "t") for u in layer_units)
    tail = unit_bytes("tail")
    embed = unit_bytes("embed")
    tied = model.lm_head_params == 0
    if tied:
        tail += embed
    all_layers = sum(unit_total(u) for u in layer_units)
    grad_op = train.strategy == "fsdp-grad-op"
    kept_fwd = all_layers + (0 if tied else embed) if grad_op else 0  # SHARD_GRAD_OP: nothing resharded
    # In forward FSDP2 keeps each unit's flat all-gather result until the next unit's copy-out (to overlap the
    # copy-out with the next all-gather: FSDPParamGroup.wait_for_unshard), so a unit in flight costs 2x its
    # unsharded bytes; the tail's result lives on through the loss. In backward a layer has its parameters
    # and the next layer's (prefetched), and its gradients pass through the reduce-scatter input one layer at
    # a time. Checked against the rank trace (memplan validate --against trace, multi-GPU rows).
    comm = {
        "load": 0,
        # a layer's parameters (kept anyway under SHARD_GRAD_OP) and its flat all-gather result
        "forward_layer": kept_fwd + big_layer if grad_op else 2 * big_layer,
        # the last layer's copy-out: the previous unit's flat result is freed only once this unit's parameters
        # are copied out of its own (FSDPParamGroup.wait_for_unshard): 3 x a layer for that moment
        "forward_copy_out": kept_fwd + 2 * big_layer if grad_op else 3 * big_layer,
        # the same when the tail copies out: before the loss, or (tied) at the embedding, the first layer's
        # all-gather already in flight and nothing else gathered yet
        "forward_tail_copy_out": (2 * tail + big_layer) if tied else kept_fwd + big_layer + 2 * tail,
        # a tied tail (embedding, norm, lm_head) is gathered at the embedding and its flat result freed at the
        # first layer's copy-out: at the loss it is held once, beside the last layer's flat result
        "forward_loss": kept_fwd + (tail + big_layer if tied else 2 * tail),
        "backward_loss": kept_fwd + tail,
        # the tail (final norm, lm_head) is resharded after its own backward (post_backward reshards every unit).
        # Each layer's backward moments: layer_moments below
        "backward_layer": (kept_fwd + big_layer_grads) if grad_op else 2 * big_layer + big_layer_grads,
        # the embedding's backward (the last): its unit's parameters, and the first layer's reduce-scatter input
        "backward_embedding": (tail if tied else embed) + big_layer_grads,
        "optimizer": 0,
    }
    total = sum(cnt * d0 * rest * eb for _, cnt, d0, rest, eb, k in params if not (k == "q" and q_whole))
    notes = []
    if q_whole:
        notes.append("4-bit weights stored as uint8 are not sharded: accelerate leaves them out of FSDP2 "
                     "(ignored_params), so every rank holds them whole; --quant-storage bf16 shards them")
    if train.fsdp_version == 1:
        notes.append("FSDP1 estimated with FSDP2's terms (same shard bytes up to padding); not traced")
    host = 0
    if train.offload == "params":
        # CPUOffload(offload_params=True): shards, gradients and optimizer states live in host RAM
        host = (sum(weights.values()) - weights["quant_state"] + shard_t + int(shard_t) + states * frac) * n
        weights = {"weights_quantized": 0, "quant_state": w["quant_state"], "weights_unquantized": 0}
        return RankView(weights=weights, lora=0, gradients=0, states=0, comm=comm, host_bytes=int(host),
                        comm_bytes_per_step=3 * _ring(n, total), notes=notes)
    def pending(*units):  # one layer's (or the embedding's) gradient shards
        return sum(_ceil(d0, n) * rest * eb for u, _, d0, rest, eb, k in params if k == "t" and u in units)

    order = [u for u, (cnt, _) in zip(layer_units, model.layers) for _ in range(cnt)]  # every layer, in order
    layer_params = {u: unit_bytes(u) for u in layer_units}
    layer_grads = {u: unit_bytes(u, "t") for u in layer_units}
    layer_shards = {u: pending(u) for u in layer_units}
    tail_grads = unit_bytes("tail", "t") + (unit_bytes("embed", "t") if tied else 0)
    return RankView(weights=weights, lora=0 if train.method == "full" else shard_t, gradients=shard_t,
                    layer_moments=_fsdp_layer_moments(order, layer_params, layer_grads, layer_shards, tail_grads,
                                                      shard_t - pending("embed"), embed, tail, tied, grad_op),
                    gradients_embedding=shard_t - pending("embed", "tail" if tied else "embed"),
                    states=int(states * frac), comm=comm, host_bytes=0,
                    comm_bytes_per_step=2 * _ring(n, total) + _ring(n, trainable["bytes"]), notes=notes)


def _fsdp_layer_moments(order, params, grads, shards, tail_grads, done_all, embed, tail, tied, grad_op) -> dict:
    """{layer index: (in flight during its backward and until its post-backward reshards it, in flight at its
    post-backward reduce, gradient shards done)} for the layers whose backward can hold the most: the first two,
    the last two, and the one with the most in flight. FSDP2
    (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, torch 2.13), per layer i, backward runs L-1 .. 0:
    - pre_backward(i) (a hook on the layer's forward outputs) all-gathers i unless it is unsharded already
      (SHARD_GRAD_OP keeps every unit unsharded from its forward, reshard_after_forward=False), copies it out
      (wait_for_unshard frees the flat result at once outside forward), then _backward_prefetch issues the
      all-gather of the unit before it in forward order (i - 1; the embedding, or the tied tail, before layer 0)
      whose flat result waits un-copied until pre_backward(i - 1). Nothing to prefetch under SHARD_GRAD_OP.
    - a checkpointed layer recomputes its forward inside its backward: FSDP's pre_forward runs again but finds
      the unit unsharded (unshard is a no-op) and post_forward does not reshard inside backward (is_bw()).
    - post_backward(i) (RegisterPostBackwardFunction on the layer's inputs, after its backward) reshards i,
      frees the previous unit's reduce-scatter input (reduce_scatter_states, reduce_scatter_max_input_buffers=1),
      then foreach_reduce copies i's unsharded gradients into a new full-size input (2 x the gradients), kept
      until post_backward(i - 1). While i runs its backward the input of the unit after it (i + 1, or the tail
      of final norm and lm_head after the last layer) is alive.
    Layers of unequal size come from their groups, every layer in forward order."""
    last = len(order) - 1
    full = [params[u] for u in order]
    before, done_before = [0], [done_all]  # parameters of layers 0..i-1; gradient shards done before layer i runs
    for u, b in zip(order, full):
        before.append(before[-1] + b)
        done_before.append(done_before[-1] - shards[u])

    def moment(i):
        rs_next = grads[order[i + 1]] if i < last else tail_grads
        if grad_op:  # layers 0..i and the embedding unsharded since forward (the tied tail: prefetched at layer 0)
            held = before[i + 1] + (0 if tied else embed) + (tail if tied and i == 0 else 0)
            prior = held - full[i]
        else:  # this layer and the prefetched unit before it (flat all-gather result)
            prior = full[i - 1] if i > 0 else (tail if tied else embed)
            held = full[i] + prior
        return held + rs_next, prior + 2 * grads[order[i]], done_before[i + 1]

    wanted = {0, min(1, last), max(last - 1, 0), last}
    if len(params) > 1:  # layer groups of unequal size: also the layer with the most in flight
        wanted.add(max(range(last + 1), key=lambda i: sum(moment(i)[::2])))
    return {i: moment(i) for i in sorted(wanted)}


def _zero(model, train, w, trainable, states) -> RankView:
    from memplan.estimate import optimizer

    n = train.gpus
    stage = int(train.strategy[-1])
    inner = train.with_(upcast=False, lora_dtype=train.compute_dtype)
    c = DTYPES[train.compute_dtype]
    pt = trainable["params"]
    p16, g16 = c * pt, c * pt
    # fp32 master weights, fp32 gradient partition and optimizer states. DeepSpeed's estimators: stage 2
    # "2 params16 + 18 (2 grads16, 4 grads32, 4 params32, 8 states)" per parameter; stage 3 "18" in all
    # (2 params16 + 16: no persistent 16-bit gradient partition)
    fp32 = 4 * pt + 4 * pt + optimizer.states(model, train.with_(lora_dtype="fp32"), pt, 4 * pt)
    notes = ["DeepSpeed's bf16/fp16 engine casts the module to the compute dtype: PEFT's fp32 adapters and the "
             "fp32 upcast become 16-bit; fp32 master weights, gradients and optimizer states live in the optimizer"]
    from memplan.estimate.weights import weights as weights_of

    w16 = weights_of(model, inner)
    frozen = dict(w16)
    if train.method == "full":
        frozen["weights_unquantized"] = 0  # the weights are the trainable 16-bit parameters
    params = _params(model, inner)
    layer_units = [f"layer{i}" for i in range(len(model.layers))]
    big_layer = max(sum(n * _ceil(d0, n) * rest * eb for u, cnt, d0, rest, eb, k in params if u == un)
                    for un in layer_units)
    if stage == 3:
        persist = lambda d0, rest: d0 * rest < ZERO3_PERSIST  # noqa: E731
        frozen = {"weights_quantized": _sum_sharded(params, n, "q", persist),
                  "quant_state": w16["quant_state"],
                  "weights_unquantized": 0 if train.method == "full" else _sum_sharded(params, n, "u", persist)}
        p16 = _sum_sharded(params, n, "t", persist)
        g16 = 0  # counted in the fp32 part above, as DeepSpeed's stage-3 estimator does
    elif stage == 2:
        g16 = _ceil(g16, n)
    fp32_rank = _ceil(fp32, n)
    bucket = min(ZERO_REDUCE_BUCKET, pt) * c
    comm = {"load": 0, "forward_loss": 0, "forward_layer": 0, "backward_loss": bucket, "backward_layer": bucket,
            "optimizer": 0}
    if stage == 3:
        prefetch = min(ZERO3_PREFETCH * c, big_layer)
        for k in ("forward_loss", "forward_layer", "backward_loss", "backward_layer"):
            comm[k] += big_layer + prefetch
    host = 0
    if train.offload in ("optimizer", "params"):  # ZeRO-Offload: gradients go to the host for the CPU step
        host += (fp32_rank + g16) * n
        fp32_rank = g16 = 0
    if train.offload == "params":
        host += (sum(frozen.values()) - frozen["quant_state"] + p16) * n
        frozen = {"weights_quantized": 0, "quant_state": frozen["quant_state"], "weights_unquantized": 0}
        p16 = 0
    lora = 0 if train.method == "full" else p16
    if train.method == "full":
        frozen["weights_unquantized"] = p16
    total16 = sum(w16.values()) - w16["quant_state"]
    comm_step = (2 * _ring(n, c * pt)) if stage < 3 else 2 * _ring(n, total16) + _ring(n, c * pt)
    return RankView(weights=frozen, lora=lora, gradients=g16, states=fp32_rank, comm=comm, host_bytes=host,
                    comm_bytes_per_step=comm_step, activation_train=inner, notes=notes)


def _sum_sharded(params, n, kind, persist) -> int:
    return sum(cnt * (d0 * rest if persist(d0, rest) else _ceil(d0, n) * rest) * eb
               for _, cnt, d0, rest, eb, k in params if k == kind)


@lru_cache(maxsize=None)
def nccl_bytes() -> int:
    """NCCL's communicator buffers on each GPU, a device overhead (not a tensor): overhead.json nccl_bytes."""
    import json
    from pathlib import Path

    return json.loads((Path(__file__).parent / "overhead.json").read_text())["nccl_bytes"]
