"""`memplan replay SNAPSHOT`: replay a real memory snapshot's allocations through memplan's model of the CUDA caching
allocator and compare the predicted reserved memory with what the real allocator reserved (its segment events).

The snapshot is `torch.cuda.memory._snapshot()` dumped as JSON, or the pickle `torch.cuda.memory._dump_snapshot`
writes (read with a restricted unpickler: plain containers, strings and numbers only). Imports no torch.
"""
from __future__ import annotations

import json
import sys

GIB = 2**30


def register(sub) -> None:
    p = sub.add_parser("replay", help="replay a real memory snapshot through the caching-allocator model",
                       description="Replay the allocation trace of a torch.cuda.memory snapshot (JSON, or the pickle "
                                   "_dump_snapshot writes) through memplan's model of PyTorch's CUDA caching "
                                   "allocator; compare predicted with measured reserved memory. Sizes are GiB.")
    p.add_argument("snapshot", help="snapshot file: .json (json.dump of torch.cuda.memory._snapshot()) or .pickle")
    p.add_argument("--alloc-conf", metavar="STR", default=None,
                   help="replay under this PYTORCH_CUDA_ALLOC_CONF instead of the snapshot's own allocator settings")
    p.add_argument("--device", type=int, default=0, help="which device's trace (default 0)")
    p.add_argument("--gpu", help="replay on this catalog GPU's memory (reports where it would run out)")
    p.add_argument("--budget", metavar="SIZE", help="replay on this much GPU memory, e.g. 24GiB")
    p.add_argument("--alloc-csv", metavar="PATH.csv", help="write requested / allocated / reserved through the replay")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from memplan.allocator import parse_alloc_conf, replay
    from memplan.allocator.report import summary_lines, write_csv
    from memplan.allocator.snapshot import config_of, read_snapshot, stream_of
    from memplan.commands.trace import gpu_bytes_from
    from memplan.errors import MemplanError

    if args.alloc_csv:
        from memplan.outputs import output_path

        output_path(args.alloc_csv, "--alloc-csv")
    if args.device < 0:
        raise MemplanError("--device must be 0 or more")
    gpu_bytes = gpu_bytes_from(args)
    snap = read_snapshot(args.snapshot)
    conf = parse_alloc_conf(args.alloc_conf) if args.alloc_conf is not None else config_of(snap)
    if conf.per_process_memory_fraction is not None and gpu_bytes is None:
        raise MemplanError("per_process_memory_fraction is a fraction of the GPU's memory: give --gpu or --budget")
    s = stream_of(snap, args.device)
    result = replay(s.stream, conf, capacity=gpu_bytes, device_total=gpu_bytes)
    result.notes.extend(s.notes)
    if args.alloc_csv:
        write_csv(result, args.alloc_csv)
    measured = s.measured_peak_reserved
    error = (result.peak_reserved_bytes - measured) / measured if measured else None
    if args.json:
        json.dump({"snapshot": args.snapshot, **result.to_dict(), "measured_peak_reserved_bytes": measured,
                   "reserved_error": error, "units": "bytes"}, sys.stdout, indent=2)
        print()
        return 0
    print("\n".join(summary_lines(result)))
    if measured:
        print(f"  measured max reserved (the snapshot's segment events) {measured / GIB:,.3f} GiB: predicted "
              f"{error:+.2%}")
    return 0
