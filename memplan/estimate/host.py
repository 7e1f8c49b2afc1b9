"""Host memory beside device memory, the host-link traffic of offloading, and what paging really saves.

    host_plan(model, train, a, states, trainable_bytes, tokens) -> dict (bytes)

Host RAM (the process's, on the CPU side):
- loading: transformers 5 `from_pretrained` reads each tensor from the mmapped safetensors shards (safetensors
  safe_open; the shard pages are page cache, reclaimable, not counted here), converts it to the load dtype on the
  host and moves it to the device, where bitsandbytes quantizes it on load (Linear4bit / Int8Params .to(cuda)).
  One tensor is materialized on the host at a time: its peak is the largest parameter tensor in the 16-bit
  checkpoint dtype (transformers 5 fuses MoE experts on load into one 3-D tensor per layer, so for MoE that is
  the layer's experts).
- offloaded activations (pinned): what estimate/activations.py puts on the host under --activation-offload, at the
  end of the forward; with `all` also the tensors saved after the last layer (the final norm's input and, outside
  the lm_head scope TRL excludes, the loss's fp32 log_softmax: b·s·V·4 B).
- paged optimizer states: bitsandbytes' paged optimizers allocate their states in CUDA managed memory
  (cudaMallocManaged, bitsandbytes/functional.py get_paged); under memory pressure the driver evicts pages to host
  RAM, so the host must be able to hold all of them.
Not counted: the Python / torch / CUDA runtime's own host memory (a few GiB of libraries, unmeasured here).

Paging (`paging`): the smallest device budget at which a paged optimizer keeps the step alive is the peak with the
states evicted: every phase's total less the states, except in the optimizer step, which pages one parameter's
states back at a time (bitsandbytes Optimizer8bit.prefetch_state per parameter) and so needs the largest one.
Its cost: the evicted states cross the host link twice per step (out under pressure, back for step()).
"""
from __future__ import annotations

from functools import lru_cache

from memplan.estimate.activations import Activations, Ctx
from memplan.spec import ModelSpec, TrainSpec

CKPT_DTYPE_BYTES = 2  # hub checkpoints of the catalog models are bf16 / fp16


@lru_cache(maxsize=256)
def _largest_param(model: ModelSpec) -> int:
    largest = max(model.embedding_params, model.lm_head_params)
    for _, layer in model.layers:
        largest = max([largest, layer.expert_params] + [lin.weight_numel for lin in layer.linears])
    return largest


def offload_bytes(model: ModelSpec, train: TrainSpec, a: Activations, tokens: int) -> tuple[int, int]:
    """(pinned host bytes at the end of the forward, bytes copied back to the device in backward)."""
    if train.activation_offload == "off":
        return 0, 0
    host = tokens * sum(a.host_per_layer)
    back = host
    if train.activation_offload == "all" and train.loss == "standard":
        # after the last layer: the final norm's fp32 input and the loss's log_softmax; both are still in TRL's
        # 5-tensor forward stash when backward starts, so they are not copied back
        tail = tokens * (model.hidden_size * Ctx.of(train).e + 4 * model.vocab_size)
        host += tail
    return host, back


def host_plan(model: ModelSpec, train: TrainSpec, a: Activations, states: int, tokens: int) -> dict:
    offloaded, back = offload_bytes(model, train, a, tokens)
    paged = states if train.optimizer.startswith("paged") else 0
    load = _largest_param(model) * CKPT_DTYPE_BYTES
    training = offloaded + paged
    return {
        "load_transient_bytes": load,
        "offloaded_activations_bytes": offloaded,
        "paged_optimizer_bytes": paged,
        "peak_bytes": max(load, training),
        "peak_phase": "load" if load >= training else "training",
        "pcie_to_host_bytes_per_step": offloaded + paged,
        "pcie_to_device_bytes_per_step": back + paged,
    }


def per_node(host: dict, gpus: int, offloaded_state: int) -> dict:
    """The host plan of one node running every rank (#13): each rank's process loads, offloads activations and
    pages its own states, and the node also holds the ranks' offloaded weights / optimizer states (parallel.py's
    per-node figure). Loading is taken as rank by rank in parallel (every rank reads its largest tensor at once)."""
    out = {k: v * gpus for k, v in host.items() if k.endswith("_bytes") or k.endswith("_per_step")}
    out["offloaded_state_bytes"] = offloaded_state
    training = out["offloaded_activations_bytes"] + out["paged_optimizer_bytes"] + offloaded_state
    out["peak_bytes"] = max(out["load_transient_bytes"], training)
    out["peak_phase"] = "load" if out["load_transient_bytes"] >= training else "training"
    out["gpus_per_node"] = gpus
    return out


def paging(train: TrainSpec, phase_components: dict, states: int, per_param: float,
           largest_trainable: int) -> dict | None:
    """The device floor of a paged optimizer (module docstring), or None when the optimizer is not paged."""
    if not train.optimizer.startswith("paged") or not states:
        return None
    floor = 0
    for phase, comps in phase_components.items():
        total = sum(comps.values())
        held = comps.get("optimizer_states", 0)
        need = int(per_param * largest_trainable) if phase == "optimizer" else 0
        floor = max(floor, total - held + min(held, need))
    return {"floor_bytes": floor, "evictable_bytes": states, "pcie_bytes_per_step_at_floor": 2 * states}


def seconds(nbytes: int, gbs: float) -> float | None:
    """Time to move nbytes at gbs GB/s (10^9 B/s): a lower bound (pinned copies reach ~80-90% of the link)."""
    return nbytes / (gbs * 1e9) if gbs else None
