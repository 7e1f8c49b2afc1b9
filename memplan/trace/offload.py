"""Activation offloading in the trace: saved tensors moved to pinned host memory and brought back for backward.

Two recipes, each the library code's rules, run on meta (or real CPU) tensors so that the tracker sees the device
side and `HostLedger` the host side:

- `checkpoints` (transformers 5.24 `activation_checkpointing_enable(offload=True)`, modeling_utils.py): the real
  transformers code wraps each checkpointed layer in `torch.autograd.graph.save_on_cpu(pin_memory=True)`. Under
  non-reentrant checkpointing the only tensors saved in that scope are the layer's inputs (torch/utils/checkpoint.py
  `_NoopSaveInputs`: everything inside the layer is saved through the checkpoint's own, inner hooks), so exactly
  the checkpointed layer inputs go to the host. `save_on_cpu` copies a meta tensor to the CPU, which meta cannot
  do: the trace swaps in `SaveOnHost`, the same pack/unpack rule (host copy at pack, a fresh device copy at unpack).
- `all` (TRL 1.16 `trl.models.get_act_offloading_ctx_manager` -> `OffloadActivations`, the torchtune design, around
  the whole training step as SFTTrainer.training_step does): `OffloadActivationsModel` follows its rules with its
  defaults (use_streams=True, use_pin_memory=True, min_offload_size=1024, max_fwd_stash_size=5): tensors under
  1024 bytes, parameters and the output head (a NoOpManager around lm_head) stay on the device; a storage already
  offloaded in the current stash window stays on the device (kept by reference until its backward); a non-contiguous
  tensor or one at a storage offset is first copied contiguous on the device; the 5 most recent offloaded tensors
  stay alive on the device (forward stash) while their copies stream out; in backward a tensor brought back lives
  until the autograd node after the one that unpacked it finishes (bwd stash). TRL's class itself needs a CUDA/XPU
  device (streams, events, `data_ptr` storage keys that are all 0 on meta), so the rules are re-stated here over
  storage identities.

The host copy is made untracked (the device tracker does not see it); `HostLedger` counts host bytes live, their
peak, and PCIe bytes each way.
"""
from __future__ import annotations

import contextlib
import weakref

from memplan.trace.kernels import _untracked


class HostLedger:
    """Pinned host bytes held by offloaded activations, and the bytes moved over the host link."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.to_host = 0
        self.to_device = 0
        self.tensors = 0

    def hold(self, host_tensor) -> None:
        n = host_tensor.untyped_storage().nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        self.to_host += n
        self.tensors += 1
        weakref.finalize(host_tensor.untyped_storage(), self._release, n)

    def _release(self, n: int) -> None:
        self.live -= n

    def per_step(self, steps: int) -> dict:
        return {"host_peak_bytes": self.peak, "pcie_to_host_bytes_per_step": self.to_host // steps,
                "pcie_to_device_bytes_per_step": self.to_device // steps, "offloaded_tensors_per_step":
                self.tensors // steps, "units": "bytes"}


def offload_note(train, ledger: HostLedger, steps: int) -> str:
    how = ("transformers' offloaded checkpointing (save_on_cpu around each checkpointed layer; its host copy made "
           "meta-safe)" if train.activation_offload == "checkpoints" else
           "TRL OffloadActivations' rules (min 1024 B, 5-tensor forward stash, lm_head kept), re-stated for meta")
    return (f"activation offload {train.activation_offload}: {how}; pinned host peak {ledger.peak / 2**30:.3f} GiB, "
            f"PCIe {(ledger.to_host + ledger.to_device) / steps / 2**30:.3f} GiB per step")


def _host_copy(t):
    """The pinned host copy, made where the device tracker does not see it (meta stands in for the host)."""
    import torch

    with _untracked(), torch.no_grad():
        return torch.empty_like(t).copy_(t) if t.device.type != "meta" else torch.empty_like(t)


def _device_copy(host, ledger: HostLedger):
    """The H2D copy at unpack: a new device tensor, tracked."""
    import torch

    ledger.to_device += host.untyped_storage().nbytes()
    with torch.no_grad():
        out = torch.empty_like(host)
        if host.device.type != "meta":
            out.copy_(host)
    return out


def save_on_host(ledger: HostLedger):
    """A `torch.autograd.graph.save_on_cpu` stand-in with the same rule: every saved tensor goes to the host."""
    import torch

    class SaveOnHost(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(lambda t: _host(t), lambda h: _device_copy(h, ledger))

    def _host(t):
        h = _host_copy(t)
        ledger.hold(h)
        return h

    return SaveOnHost


@contextlib.contextmanager
def checkpoint_offload(ledger: HostLedger):
    """transformers' offloaded checkpointing with its save_on_cpu swapped for SaveOnHost (module docstring)."""
    import transformers.modeling_utils as mu

    saved = mu.save_on_cpu
    mu.save_on_cpu = save_on_host(ledger)
    try:
        yield
    finally:
        mu.save_on_cpu = saved


MIN_OFFLOAD_SIZE = 1024  # trl OffloadActivations(min_offload_size=1024)
MAX_FWD_STASH = 5  # trl OffloadActivations(max_fwd_stash_size=5)


class OffloadActivationsModel:
    """TRL OffloadActivations' rules as a saved_tensors_hooks pair (module docstring), plus the NoOp scope around
    the output head that get_act_offloading_ctx_manager installs. `with x.step(): forward; backward` per step."""

    def __init__(self, model, ledger: HostLedger):
        import torch

        self.ledger = ledger
        # TRL keeps the parameters' storage pointers (update_model_params). Here a storage's identity is its
        # StorageImpl address, which a parameter whose storage is replaced later frees for any new storage to reuse
        # (bitsandbytes' Linear4bit.forward casts its bias: `self.bias.data = self.bias.data.to(x.dtype)`), so an
        # activation could be taken for a parameter at random: each entry holds a weak reference to its storage
        self.params = {p.untyped_storage()._cdata: weakref.ref(p.untyped_storage()) for p in model.parameters()}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        noop = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        self.handles = []
        for name, module in model.named_modules():
            if name.split(".")[-1] == "lm_head":
                self.handles.append(module.register_forward_pre_hook(lambda *a: noop.__enter__()))
                self.handles.append(module.register_forward_hook(lambda *a: noop.__exit__(), always_call=True))
                break
        self._reset()

    def _reset(self):
        self.id = 0
        self.tracker, self.fwd_stash, self.bwd_stash = {}, {}, {}
        self.keys, self.key_of = {}, {}
        self.node = None
        self.first_backward = True

    @contextlib.contextmanager
    def step(self):
        self._reset()
        try:
            with self.hooks:
                yield
        finally:
            self._reset()  # __exit__ synchronizes the streams and clears the stashes

    def remove(self):
        for h in self.handles:
            h.remove()
        self._reset()

    @staticmethod
    def _key(t):
        return (t.untyped_storage()._cdata, t.storage_offset(), t.dtype)

    def _release_key(self, tid):
        k = self.key_of.pop(tid, None)
        if k is not None and self.keys.get(k, (None,))[0] == tid:
            del self.keys[k]

    def _seen(self, k) -> bool:
        """TRL keys storages by data_ptr + offset + dtype; a key whose storage has died (its address free for reuse
        by the allocator) is stale. Here the key holds a weak reference, so a reused address never matches."""
        entry = self.keys.get(k)
        return entry is not None and entry[1]() is not None

    def _pack(self, t):
        import torch

        self.id += 1
        tid = self.id
        k = self._key(t)
        storage = t.untyped_storage()
        if self._seen(k):  # the same storage, offloaded and still stashed: keep this reference on the device
            self.tracker[tid] = (t, False)
            self.keys[k], self.key_of[tid] = (tid, weakref.ref(t.untyped_storage())), k
            return tid
        param = self.params.get(storage._cdata)
        if (t.element_size() * t.nelement() < MIN_OFFLOAD_SIZE or isinstance(t, torch.nn.Parameter)
                or (param is not None and param() is storage)):
            self.tracker[tid] = (t, False)
            return tid
        broadcast = 0 in t.stride()
        if not broadcast and (not t.is_contiguous() or t.storage_offset() != 0):
            t = t.clone(memory_format=torch.contiguous_format) if t.storage_offset() else t.contiguous()
        for old in list(self.fwd_stash):  # the stash keeps the last MAX_FWD_STASH offloaded on the device
            if old <= tid - MAX_FWD_STASH:
                del self.fwd_stash[old]
                self._release_key(old)
            else:
                break
        if broadcast:  # the whole storage goes to the host
            n = t.untyped_storage().nbytes() // t.element_size()
            host = _host_copy(torch.as_strided(t, (n,), (1,), 0))
            shape = (t.size(), t.stride(), t.storage_offset())
        else:
            host, shape = _host_copy(t), None
        self.ledger.hold(host)
        self.tracker[tid] = ((host, shape), True)
        self.fwd_stash[tid] = t
        self.keys[k], self.key_of[tid] = (tid, weakref.ref(storage)), k
        return tid

    def _unpack(self, tid):
        import torch

        value, offloaded = self.tracker.pop(tid)
        self._release_key(tid)
        if not offloaded:
            return value
        if self.first_backward:  # at the end of backward every tensor brought back is dropped
            self.first_backward = False
            torch.autograd.Variable._execution_engine.queue_callback(self.bwd_stash.clear)
        node = torch._C._current_autograd_node()
        prev = []
        if node is not None and node is not self.node:  # a new node: the previous node's tensors go when it ends
            self.node = node
            prev = list(self.bwd_stash)
        if tid in self.fwd_stash:  # still on the device; the node's hook below still clears the forward stash
            dev = self.fwd_stash[tid]
        else:
            host, shape = value
            dev = _device_copy(host, self.ledger)
            if shape is not None:
                dev = torch.as_strided(dev, *shape)
            self.bwd_stash[tid] = dev

        def done(outputs, inputs):
            self.fwd_stash.clear()
            for old in prev:
                self.bwd_stash.pop(old, None)
            return outputs

        if node is not None:
            node.register_hook(done)
        return dev
