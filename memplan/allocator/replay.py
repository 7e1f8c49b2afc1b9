"""Replay an allocation stream through the caching-allocator model and report what the allocator would reserve.

A stream is a sequence of events `(op, handle, nbytes, stream, phase, label)`:
    op      1 = allocate nbytes (a tensor storage), 0 = free the allocation made under `handle`
    handle  any hashable that names one allocation while it lives (reused after its free is fine)
    stream  CUDA stream id (0 = the default stream)
    phase   the training phase the event happened in ("load", "forward", ...), carried into the report
    label   who allocated (module name) or "", for the out-of-memory report
The trace writes one (memplan/trace/tracker.py, record_allocations=True); memplan/allocator/snapshot.py reads one
from a real torch.cuda.memory._snapshot().
"""
from __future__ import annotations

from dataclasses import dataclass, field

from memplan.allocator.config import AllocatorConfig
from memplan.allocator.model import AllocatorOutOfMemory, CachingAllocator

ALLOC, FREE = 1, 0


@dataclass
class OutOfMemoryEvent:
    event: int  # index in the stream
    phase: str
    label: str
    requested_bytes: int
    allocated_bytes: int  # allocated when it failed
    reserved_bytes: int  # reserved after the allocator freed its cache and retried

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ReplayResult:
    config: AllocatorConfig
    events: int
    peak_reserved_bytes: int  # predicted torch.cuda.max_memory_reserved()
    peak_allocated_bytes: int  # predicted torch.cuda.max_memory_allocated() (block sizes: rounded)
    peak_requested_bytes: int  # the tensor bytes (the trace's peak when the stream is a trace's)
    reserved_peak_event: int
    reserved_peak_phase: str
    allocated_at_reserved_peak: int
    largest_free_at_reserved_peak: int  # largest cached block when reserved peaked
    reserved_at_allocated_peak: int
    largest_free_at_allocated_peak: int  # largest cached block at the allocated (tensor) peak
    allocated_peak_event: int
    allocated_peak_phase: str
    segments_at_reserved_peak: int
    num_alloc_retries: int
    num_device_alloc: int
    num_device_free: int
    capacity_bytes: int | None = None
    oom: OutOfMemoryEvent | None = None
    phase_reserved: dict = field(default_factory=dict)  # peak reserved per phase
    timeline: list = field(default_factory=list, repr=False)  # (event, requested, allocated, reserved, phase)
    notes: list = field(default_factory=list)

    @property
    def fragmentation_bytes(self) -> int:
        """reserved - allocated at the allocated peak (the step's busiest instant): cached blocks that no tensor
        uses then, split remainders, rounding."""
        return self.reserved_at_allocated_peak - self.peak_allocated_bytes

    def to_dict(self) -> dict:
        return {
            "alloc_conf": self.config.text, "expandable_segments": self.config.expandable_segments,
            "events": self.events, "peak_reserved_bytes": self.peak_reserved_bytes,
            "peak_allocated_bytes": self.peak_allocated_bytes, "peak_requested_bytes": self.peak_requested_bytes,
            "reserved_peak_event": self.reserved_peak_event, "reserved_peak_phase": self.reserved_peak_phase,
            "allocated_at_reserved_peak_bytes": self.allocated_at_reserved_peak,
            "largest_free_block_at_reserved_peak_bytes": self.largest_free_at_reserved_peak,
            "allocated_peak_event": self.allocated_peak_event, "allocated_peak_phase": self.allocated_peak_phase,
            "reserved_at_allocated_peak_bytes": self.reserved_at_allocated_peak,
            "fragmentation_at_allocated_peak_bytes": self.fragmentation_bytes,
            "largest_free_block_at_allocated_peak_bytes": self.largest_free_at_allocated_peak,
            "segments_at_reserved_peak": self.segments_at_reserved_peak,
            "num_alloc_retries": self.num_alloc_retries, "num_device_alloc": self.num_device_alloc,
            "num_device_free": self.num_device_free, "capacity_bytes": self.capacity_bytes,
            "phase_reserved_bytes": dict(self.phase_reserved),
            "oom": self.oom.to_dict() if self.oom else None, "notes": list(self.notes),
        }


def replay(stream, config: AllocatorConfig | None = None, *, capacity: int | None = None,
           device_total: int | None = None, keep_timeline: bool = True) -> ReplayResult:
    """Run every event of `stream` through a fresh CachingAllocator.

    capacity: bytes the allocator may reserve (the GPU's memory less the CUDA context and anything else outside
    PyTorch); the first allocation that fails even after the allocator freed its cache stops the replay (the run
    would raise torch.OutOfMemoryError there) and is reported in `.oom`.
    """
    config = config or AllocatorConfig()
    alloc = CachingAllocator(config, capacity=capacity, device_total=device_total)
    live: dict = {}
    timeline: list = []
    phase_reserved: dict = {}
    peak_res = peak_alloc = peak_req = 0
    res_event, res_phase, alloc_at_res, largest_at_res, segs_at_res, res_at_alloc = 0, "", 0, 0, 0, 0
    alloc_event, alloc_phase, largest_at_alloc = 0, "", 0
    oom = None
    n = seen = 0
    largest_before = 0
    malloc, free = alloc.malloc, alloc.free
    for n, (op, handle, nbytes, strm, phase, label) in enumerate(stream):
        seen = n + 1
        if op == ALLOC:
            if nbytes <= 0:
                continue  # CUDACachingAllocator::allocate(0) never reaches malloc
            try:
                live[handle] = malloc(nbytes, strm)
            except AllocatorOutOfMemory as e:
                oom = OutOfMemoryEvent(n, phase, label or "", nbytes, e.allocated, e.reserved)
                break
        else:
            block = live.pop(handle, None)
            if block is None:
                continue
            if largest_at_alloc < 0:
                largest_before = alloc.largest_free_block()
            free(block)
        reserved, allocated = alloc.reserved, alloc.allocated
        if reserved > peak_res:
            peak_res, res_event, res_phase, alloc_at_res = reserved, n, phase, allocated
            largest_at_res, segs_at_res = alloc.largest_free_block(), alloc.segments
        if allocated > peak_alloc:
            peak_alloc, res_at_alloc, alloc_event, alloc_phase = allocated, reserved, n, phase
            largest_at_alloc = -1  # measured lazily: only once memory falls from this peak
        elif largest_at_alloc < 0:
            largest_at_alloc = largest_before
        if alloc.requested > peak_req:
            peak_req = alloc.requested
        if reserved > phase_reserved.get(phase, -1):
            phase_reserved[phase] = reserved
        if keep_timeline:
            timeline.append((n, alloc.requested, allocated, reserved, phase))
    return ReplayResult(
        config=config, events=seen, peak_reserved_bytes=peak_res,
        peak_allocated_bytes=peak_alloc, peak_requested_bytes=peak_req, reserved_peak_event=res_event,
        reserved_peak_phase=res_phase, allocated_at_reserved_peak=alloc_at_res,
        largest_free_at_reserved_peak=largest_at_res, reserved_at_allocated_peak=res_at_alloc,
        largest_free_at_allocated_peak=alloc.largest_free_block() if largest_at_alloc < 0 else largest_at_alloc,
        allocated_peak_event=alloc_event, allocated_peak_phase=alloc_phase, segments_at_reserved_peak=segs_at_res, num_alloc_retries=alloc.num_alloc_retries,
        num_device_alloc=alloc.num_device_alloc, num_device_free=alloc.num_device_free, capacity_bytes=capacity,
        oom=oom, phase_reserved=phase_reserved, timeline=timeline,
    )
