"""A live-bytes tracker: counts every tensor storage that PyTorch creates, while it lives.

Shared by the meta trace (memplan/trace/) and the real CPU profiler (memplan/profile/). Stable public names:

    LiveBytesTracker(budget_bytes=None)      a TorchDispatchMode; use as `with tracker: ...`
        .phase: str                          settable: "load", "forward", "backward", "optimizer" (any str works)
        .current: int                        live tensor bytes now
        .peak: int                           the highest .current seen
        .peak_phase: str                     the phase at the peak
        .phase_peaks: dict[str, int]         highest .current seen while each phase was set
        .timeline: list[(event, bytes, phase)]  live bytes after each allocation / release (event = counter)
        .register(tensor, category, module="")  count a tensor that existed before tracking (parameters, quant
                                             states); re-registering a storage relabels it
        .label(tensor, category)             relabel a tracked tensor's storage (e.g. a .grad -> "gradients")
        .peak_records(): list[StorageRecord] the storages live at the peak instant, largest first
        .by_category(records=None) -> dict   bytes per category (of the peak records by default)
        .budget_bytes: int | None            simulate an out-of-memory: an allocation that would take .current
                                             above it raises TrackerOutOfMemory
        .allocations: list | None            with record_allocations=True, the allocation stream in the order the
                                             step made it: (1, handle, nbytes, 0, phase, module) for an allocation,
                                             (0, handle, 0, 0, phase, "") for its release (memplan/allocator/replay.py
                                             replays it through the caching-allocator model)
        .module: str                         who is allocating now (set by the caller's module hooks; "" if none)
        .default_category: str               category for new storages that nobody labels ("temporaries")
    StorageRecord                            nbytes, category, module, phase, shape, dtype, event
    TrackerOutOfMemory(RuntimeError)         .requested_bytes, .live_bytes, .phase, .budget_bytes

How it counts. Every ATen op's outputs pass through __torch_dispatch__; each output tensor's *untyped storage*
is recorded once, keyed by the storage's `_cdata` (the address of its C++ StorageImpl: meta storages have no
data pointer), with `nbytes()`. Views share their base's storage and so cost nothing; in-place ops write into
an existing storage. A `weakref.finalize` on the storage's Python object (PyTorch keeps that object alive as long
as the StorageImpl lives) releases the bytes when the last tensor using it dies. A storage that an op resizes
(`out=` arguments) is re-read on every op that returns it. The counts are tensor bytes only: the CUDA context,
cuBLAS workspace and the caching allocator's rounding are invisible here (see docs/trace.md).

The peak snapshot is lazy: the set of live storages is copied only when memory first drops after a new peak,
so a 70B step with thousands of live storages stays fast. Records are shared objects: relabeling a record after
the peak (an optimizer state found after step(), a .grad found after backward) relabels it in the snapshot too.

On real CPU tensors an allocation has already happened when the tracker sees it; TrackerOutOfMemory is a
simulation of the GPU's out-of-memory error at the same point of the step, not a guard on host memory.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytesTracker", "StorageRecord", "TrackerOutOfMemory", "CATEGORIES", "PHASES"]

# Component names shared with memplan.estimate (the same keys in `estimate --json` and `trace --json`).
CATEGORIES = (
    "weights_quantized", "quant_state", "weights_unquantized", "lora", "gradients", "optimizer_states",
    "activations", "logits_loss", "temporaries",
)
PHASES = ("load", "forward", "backward", "optimizer")


class TrackerOutOfMemory(RuntimeError):
    """An allocation would take the live bytes above the tracker's budget (a simulated CUDA OOM)."""

    def __init__(self, requested_bytes: int, live_bytes: int, phase: str, budget_bytes: int, module: str = ""):
        self.requested_bytes = requested_bytes
        self.live_bytes = live_bytes
        self.phase = phase
        self.budget_bytes = budget_bytes
        self.module = module
        where = f" in {module}" if module else ""
        super().__init__(
            f"simulated out of memory during {phase}{where}: tried to allocate {requested_bytes / 2**30:.3f} GiB "
            f"with {live_bytes / 2**30:.3f} GiB live of a {budget_bytes / 2**30:.3f} GiB budget"
        )


@dataclass
class StorageRecord:
    nbytes: int
    category: str
    module: str
    phase: str
    shape: tuple
    dtype: str
    event: int
    static: bool = False  # registered before/outside the step (parameters, quant states)
    handle: int = 0  # names this storage's allocation in .allocations

    def to_dict(self) -> dict:
        return {"bytes": self.nbytes, "category": self.category, "module": self.module, "phase": self.phase,
                "shape": list(self.shape), "dtype": self.dtype}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class LiveBytesTracker(TorchDispatchMode):
    def __init__(self, budget_bytes: int | None = None, *, keep_timeline: bool = True,
                 record_allocations: bool = False):
        super().__init__()
        self.allocations: list | None = [] if record_allocations else None
        self._handles = 0
        self.budget_bytes = budget_bytes
        self.keep_timeline = keep_timeline
        self.phase = "load"
        self.module = ""
        self.default_category = "temporaries"
        self.current = 0
        self.peak = 0
        self.peak_phase = "load"
        self.peak_event = 0
        self.phase_peaks: dict[str, int] = {}
        self.timeline: list[tuple[int, int, str]] = []
        self.events = 0
        self._live: dict[int, StorageRecord] = {}  # dynamic storages, by StorageImpl address
        self._static: dict[int, StorageRecord] = {}  # registered storages
        self._static_version = 0
        self._finalizers: dict[int, weakref.finalize] = {}
        self._snapshot: list[StorageRecord] = []
        self._snapshot_static: tuple[int, list[StorageRecord]] = (-1, [])
        self._peak_dirty = False
        # Hooks a caller may set: classify(tensor, record) may change record.category when it is created.
        self.classify = None

    # ---------------------------------------------------------------------------------------------- public
    def register(self, tensor: torch.Tensor, category: str, module: str = "") -> StorageRecord | None:
        """Count a tensor that existed before tracking began (or relabel it if it is already counted)."""
        tensor = getattr(tensor, "_local_tensor", tensor)
        if not isinstance(tensor, torch.Tensor):
            return None
        storage = tensor.untyped_storage()
        key = storage._cdata
        rec = self._static.get(key) or self._live.pop(key, None)
        if rec is not None:
            rec.category = category
            if module:
                rec.module = module
            if not rec.static:
                rec.static = True
                self._static[key] = rec
                self._static_version += 1
            return rec
        rec = StorageRecord(storage.nbytes(), category, module, self.phase, tuple(tensor.shape),
                            _dtype_name(tensor.dtype), self.events, static=True)
        self._add(key, storage, rec, static=True)
        return rec

    def label(self, tensor: torch.Tensor, category: str) -> None:
        """Relabel the storage of a tracked tensor (no-op for an untracked one)."""
        tensor = getattr(tensor, "_local_tensor", tensor)
        if not isinstance(tensor, torch.Tensor):
            return
        key = tensor.untyped_storage()._cdata
        rec = self._live.get(key) or self._static.get(key)
        if rec is not None:
            rec.category = category

    def record_of(self, tensor: torch.Tensor) -> StorageRecord | None:
        tensor = getattr(tensor, "_local_tensor", tensor)
        key = tensor.untyped_storage()._cdata
        return self._live.get(key) or self._static.get(key)

    def live_records(self) -> list[StorageRecord]:
        return sorted([*self._static.values(), *self._live.values()], key=lambda r: -r.nbytes)

    def peak_records(self) -> list[StorageRecord]:
        """The storages live at the peak instant, largest first (their byte sum is .peak)."""
        if self._peak_dirty:
            self._take_snapshot()
        return sorted([*self._snapshot_static[1], *self._snapshot], key=lambda r: -r.nbytes)

    def by_category(self, records: list[StorageRecord] | None = None) -> dict[str, int]:
        records = self.peak_records() if records is None else records
        out = {c: 0 for c in CATEGORIES}
        for r in records:
            out[r.category] = out.get(r.category, 0) + r.nbytes
        return out

    # ------------------------------------------------------------------------------------------- internals
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self._record(t)
        return out

    def _record(self, tensor: torch.Tensor) -> None:
        tensor = getattr(tensor, "_local_tensor", tensor)  # a DTensor (FSDP2 shard): this rank's local tensor
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested)
            return
        key = storage._cdata
        rec = self._live.get(key) or self._static.get(key)
        nbytes = storage.nbytes()
        if rec is not None:
            if rec.nbytes != nbytes:  # resized in place (out= arguments, resize_)
                self._check_budget(nbytes - rec.nbytes)
                if self.allocations is not None:  # CUDA resize_: a new block, copy, free the old one
                    old = rec.handle
                    self._handles += 1
                    rec.handle = self._handles
                    self.allocations.append((1, rec.handle, nbytes, 0, self.phase, rec.module))
                    self.allocations.append((0, old, 0, 0, self.phase, ""))
                self._change(nbytes - rec.nbytes)
                rec.nbytes = nbytes
            return
        self._check_budget(nbytes)
        rec = StorageRecord(nbytes, self.default_category, self.module, self.phase, tuple(tensor.shape),
                            _dtype_name(tensor.dtype), self.events)
        if self.classify is not None:
            self.classify(tensor, rec)
        self._add(key, storage, rec, static=False)

    def _check_budget(self, nbytes: int) -> None:
        if self.budget_bytes is not None and nbytes > 0 and self.current + nbytes > self.budget_bytes:
            raise TrackerOutOfMemory(nbytes, self.current, self.phase, self.budget_bytes, self.module)

    def _add(self, key: int, storage, rec: StorageRecord, static: bool) -> None:
        (self._static if static else self._live)[key] = rec
        if static:
            self._static_version += 1
        self._finalizers[key] = fin = weakref.finalize(storage, self._release, key)
        fin.atexit = False
        if self.allocations is not None:
            self._handles += 1
            rec.handle = self._handles
            self.allocations.append((1, rec.handle, rec.nbytes, 0, self.phase, rec.module))
        self._change(rec.nbytes)

    def _release(self, key: int) -> None:
        self._finalizers.pop(key, None)
        if self._peak_dirty:
            self._take_snapshot()
        rec = self._live.pop(key, None)
        if rec is None:
            rec = self._static.pop(key, None)
            if rec is None:
                return
            self._static_version += 1
        if self.allocations is not None:
            self.allocations.append((0, rec.handle, 0, 0, self.phase, ""))
        self._change(-rec.nbytes)

    def _change(self, delta: int) -> None:
        self.events += 1
        self.current += delta
        phase = self.phase
        if self.current > self.phase_peaks.get(phase, -1):
            self.phase_peaks[phase] = self.current
        if self.current > self.peak or (self.peak == 0 and self.current == 0):
            self.peak = self.current
            self.peak_phase = phase
            self.peak_event = self.events
            self._peak_dirty = True
        if self.keep_timeline:
            self.timeline.append((self.events, self.current, phase))

    def _take_snapshot(self) -> None:
        self._peak_dirty = False
        self._snapshot = list(self._live.values())
        if self._snapshot_static[0] != self._static_version:
            self._snapshot_static = (self._static_version, list(self._static.values()))

    def stop(self) -> None:
        """Detach every finalizer (call after the step when the tracker's records are no longer needed)."""
        if self._peak_dirty:
            self._take_snapshot()
        for fin in list(self._finalizers.values()):
            fin.detach()
        self._finalizers.clear()
