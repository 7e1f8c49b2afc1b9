"""Replay output: the text summary, the allocated-vs-reserved CSV and figure. Sizes are GiB (2^30 bytes)."""
from __future__ import annotations

import csv

from memplan.errors import MemplanError

GIB = 2**30


def _g(n: int) -> str:
    return f"{n / GIB:,.3f}"


def summary_lines(r, device=None) -> list[str]:
    """The replay in a few lines (r: ReplayResult; device: DeviceReplay or None)."""
    lines = [
        f"caching allocator replay ({r.config.describe()}; model of torch 2.13 CUDACachingAllocator.cpp, "
        f"{r.events:,} events):",
        f"  predicted max_memory_reserved   {_g(r.peak_reserved_bytes)} GiB  (in {r.reserved_peak_phase}, "
        f"event {r.reserved_peak_event:,})",
        f"  predicted max_memory_allocated  {_g(r.peak_allocated_bytes)} GiB  (block sizes; tensor bytes "
        f"{_g(r.peak_requested_bytes)})",
        f"  at the allocated peak           ({r.allocated_peak_phase}, event {r.allocated_peak_event:,}): reserved "
        f"{_g(r.reserved_at_allocated_peak)} GiB, fragmentation {_g(r.fragmentation_bytes)} GiB reserved but "
        f"unallocated, largest free block {_g(r.largest_free_at_allocated_peak)} GiB",
        "  reserved peak by phase          " + " · ".join(f"{p} {_g(v)}" for p, v in r.phase_reserved.items()),
    ]
    if r.num_alloc_retries:
        lines.append(f"  the allocator freed its cache and retried {r.num_alloc_retries:,} times (cudaMalloc retries)")
    if device is not None:
        lines.append(f"  device total                    {_g(device.device_total_bytes)} GiB = reserved + CUDA "
                     f"context {_g(device.cuda_context_bytes)} (cuBLAS workspace {_g(device.cublas_workspace_bytes)} "
                     f"is inside reserved; {device.overhead_source})")
    if r.oom is not None:
        o = r.oom
        where = f" in {o.label.replace('base_model.model.', '', 1)}" if o.label else ""
        lines.append(f"  OUT OF MEMORY at event {o.event:,} ({o.phase}{where}): {o.requested_bytes / 2**20:,.1f} MiB "
                     f"requested with {_g(o.allocated_bytes)} GiB allocated, {_g(o.reserved_bytes)} GiB reserved of "
                     f"{_g(r.capacity_bytes or 0)} GiB the allocator may use")
    elif r.capacity_bytes is not None:
        lines.append(f"  fits: peak reserved {_g(r.peak_reserved_bytes)} of {_g(r.capacity_bytes)} GiB the "
                     f"allocator may use (headroom {_g(r.capacity_bytes - r.peak_reserved_bytes)} GiB)")
    lines.extend(f"  note: {n}" for n in r.notes)
    return lines


def downsample(timeline: list, max_points: int = 20000) -> list:
    """At most ~max_points rows; each bucket keeps its highest-reserved and highest-allocated rows and its last."""
    if len(timeline) <= max_points:
        return list(timeline)
    step = -(-len(timeline) // (max_points // 3))
    out = []
    for i in range(0, len(timeline), step):
        bucket = timeline[i:i + step]
        keep = {id(max(bucket, key=lambda r: r[3])): None, id(max(bucket, key=lambda r: r[2])): None,
                id(bucket[-1]): None}
        out.extend(r for r in bucket if id(r) in keep)
    return out


def write_csv(r, path: str, extra: dict | None = None) -> str:
    """event, phase, tensor (requested) bytes, allocated bytes, reserved bytes through the replay."""
    extra = extra or {}
    try:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*extra, "event", "phase", "requested_bytes", "allocated_bytes", "reserved_bytes",
                        "reserved_gib"])
            for event, req, alloc, res, phase in downsample(r.timeline):
                w.writerow([*extra.values(), event, phase, req, alloc, res, f"{res / GIB:.6f}"])
    except OSError as e:
        raise MemplanError(f"cannot write {path}: {e.strerror or e}") from None
    return path
