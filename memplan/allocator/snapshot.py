"""A real allocator's memory snapshot as an allocation stream, and what the real allocator reserved along it.

The snapshot is what `torch.cuda.memory._snapshot()` returns once `torch.cuda.memory._record_memory_history()` has
been on during the step: {"segments": [...], "device_traces": [[{"action", "addr", "size", "stream", ...}]],
"allocator_settings": {...}} (torch/cuda/memory.py). Two files hold it:
- JSON: `json.dump(torch.cuda.memory._snapshot(), f)`;
- a pickle: `torch.cuda.memory._dump_snapshot(path)`. It is read by an unpickler that admits only plain containers,
  strings and numbers: any class or function reference (every code-execution trick pickle has) is refused.

The trace's `alloc` / `free_completed` entries become the stream (addresses as handles); `segment_alloc` /
`segment_free` / `segment_map` / `segment_unmap` are what the real allocator reserved, the measured curve the
replay is compared with.
"""
from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from memplan.allocator.config import MB, UNLIMITED, AllocatorConfig, parse_alloc_conf
from memplan.allocator.replay import ALLOC, FREE
from memplan.errors import MemplanError

_MAX_BYTES = 2 << 30  # a snapshot file larger than this is not a snapshot memplan can hold in memory


class _PlainUnpickler(pickle.Unpickler):
    """Admits what pickle encodes without globals (dict, list, tuple, set, str, bytes, int, float, bool, None)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id")


def load_plain_pickle(data: bytes, what: str = "pickle"):
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise MemplanError(f"{what}: {e}: memplan reads only plain containers, strings and numbers from a pickle "
                           "(a memory snapshot written by torch.cuda.memory._dump_snapshot is one)") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError,
            RecursionError) as e:
        raise MemplanError(f"{what}: not a readable pickle ({e.__class__.__name__})") from None


def read_snapshot(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        raise MemplanError(f"{path!r} is a directory; give a snapshot file (.json or .pickle)")
    try:
        if p.stat().st_size > _MAX_BYTES:
            raise MemplanError(f"{path}: larger than {_MAX_BYTES >> 30} GiB; not a memory snapshot")
        data = p.read_bytes()
    except FileNotFoundError:
        raise MemplanError(f"no such file: {path}") from None
    except OSError as e:
        raise MemplanError(f"cannot read {path}: {e.strerror or e}") from None
    if data[:1] == b"\x80" or p.suffix in (".pickle", ".pkl"):
        snap = load_plain_pickle(data, path)
    else:
        try:
            snap = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MemplanError(f"{path}: neither JSON nor a pickle ({e.__class__.__name__})") from None
    if not isinstance(snap, dict) or not isinstance(snap.get("segments", []), list):
        raise MemplanError(f"{path}: not a torch.cuda.memory._snapshot() (expected a dict with 'segments' and "
                           "'device_traces')")
    return snap


def config_of(snap: dict) -> AllocatorConfig:
    """The allocator settings the snapshot was taken under (allocator_settings, torch >= 2.1)."""
    s = snap.get("allocator_settings") or {}
    text = s.get("PYTORCH_CUDA_ALLOC_CONF") or s.get("PYTORCH_ALLOC_CONF")
    if isinstance(text, str) and text.strip():
        return parse_alloc_conf(text)
    fields: dict = {}
    if s.get("expandable_segments"):
        fields["expandable_segments"] = True
    mss = s.get("max_split_size")
    if isinstance(mss, int) and 0 < mss < UNLIMITED:
        fields["max_split_size"] = mss
    gct = s.get("garbage_collection_threshold")
    if isinstance(gct, (int, float)) and 0 < gct < 1:
        fields["garbage_collection_threshold"] = float(gct)
    rpd = s.get("roundup_power2_divisions")
    if isinstance(rpd, dict) and rpd:  # {"1": d, "2": d, ...>: interval start in MB -> divisions}
        divs = [0] * 16
        for k, v in rpd.items():
            try:
                mb = int(k)
            except (TypeError, ValueError):
                continue
            divs[min(max(mb.bit_length() - 1, 0), 15)] = int(v)
        fields["roundup_power2_divisions"] = tuple(divs)
    if not fields:
        return AllocatorConfig()
    return AllocatorConfig(text="from the snapshot's allocator_settings", **fields)


@dataclass
class SnapshotStream:
    stream: list  # (op, handle, nbytes, stream, phase, label)
    measured_reserved: list = field(default_factory=list)  # (stream index, reserved bytes) after segment events
    measured_peak_reserved: int | None = None
    reserved_at_start: int = 0
    preexisting: int = 0  # allocations made before recording began (placed at the start of the stream)
    notes: list = field(default_factory=list)


def stream_of(snap: dict, device: int = 0) -> SnapshotStream:
    traces = snap.get("device_traces")
    if not isinstance(traces, list) or device >= len(traces) or not traces[device]:
        raise MemplanError("the snapshot has no allocation trace for device "
                           f"{device}: record it with torch.cuda.memory._record_memory_history() before the step, "
                           "then torch.cuda.memory._dump_snapshot(path)")
    entries = traces[device]
    frees = "free_completed" if any(e.get("action") == "free_completed" for e in entries) else "free_requested"
    events, live = [], {}
    before: list = []  # frees of blocks allocated before the trace began
    reserved_delta, measured, peak_delta = 0, [], 0
    for e in entries:
        if not isinstance(e, dict):
            raise MemplanError("malformed snapshot: a device_traces entry is not a dict")
        action, addr, size = e.get("action"), e.get("addr"), e.get("size", 0)
        if not isinstance(size, int) or (action in ("alloc", frees) and not isinstance(addr, int)):
            raise MemplanError(f"malformed snapshot: {action} entry without an integer addr/size")
        strm = e.get("stream", 0) if isinstance(e.get("stream", 0), int) else 0
        if action == "alloc":
            live[addr] = size
            events.append((ALLOC, addr, size, strm, "trace", ""))
        elif action == frees:
            if addr in live:
                del live[addr]
            else:
                before.append((ALLOC, addr, size, strm, "before", ""))
            events.append((FREE, addr, 0, strm, "trace", ""))
        elif action in ("segment_alloc", "segment_map"):
            reserved_delta += size
            peak_delta = max(peak_delta, reserved_delta)
            measured.append((len(events), reserved_delta))
        elif action in ("segment_free", "segment_unmap"):
            reserved_delta -= size
            measured.append((len(events), reserved_delta))
    segs = [s for s in snap.get("segments", []) if isinstance(s, dict) and s.get("device", 0) == device]
    end_reserved = sum(s.get("total_size", 0) for s in segs if isinstance(s.get("total_size", 0), int))
    start = max(0, end_reserved - reserved_delta)
    freed_in_trace = {ev[1] for ev in before}
    still_live = []  # allocated before the trace and never freed in it
    allocated_in_trace = {ev[1] for ev in events if ev[0] == ALLOC}
    for s in segs:
        addr = s.get("address", 0)
        for b in s.get("blocks", []):
            if isinstance(b, dict) and isinstance(b.get("address"), int):
                addr = b["address"]
            if isinstance(b, dict) and b.get("state") == "active_allocated":
                if addr not in allocated_in_trace and addr not in freed_in_trace:
                    still_live.append((ALLOC, addr, b.get("requested_size") or b.get("size", 0),
                                       s.get("stream", 0) if isinstance(s.get("stream", 0), int) else 0,
                                       "before", ""))
            addr += b.get("size", 0) if isinstance(b, dict) else 0
    out = SnapshotStream(before + still_live + events, preexisting=len(before) + len(still_live),
                         reserved_at_start=start)
    if measured:
        out.measured_reserved = [(i + out.preexisting, start + r) for i, r in measured]
        out.measured_peak_reserved = start + peak_delta
    else:
        out.notes.append("the trace holds no segment events: no measured reserved curve to compare with")
    if out.preexisting:
        out.notes.append(f"{out.preexisting} allocations were made before recording began; they are placed at the "
                         "start of the replay (their order and the cache state then are unknown)")
    return out


def describe_settings(snap: dict) -> str:
    s = snap.get("allocator_settings") or {}
    mss = s.get("max_split_size")
    return ", ".join(f"{k}={v}" for k, v in (("expandable_segments", s.get("expandable_segments")),
                                           ("max_split_size_mb", (mss // MB) if isinstance(mss, int) and
                                            mss < UNLIMITED else None)) if v is not None)
