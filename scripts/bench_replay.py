"""Benchmark the caching-allocator replay: trace a step with its allocation stream, then replay it.

    python scripts/bench_replay.py [MODEL] [SEQ]      # default: llama-2-70b 2048, QLoRA, checkpointing on

The issue's bars (#12): the replay of a Llama-2-70B QLoRA step (seq 2048) <= 10 s, the trace with --allocator
<= 60 s, on 2 CPU cores. The trace is timed twice, without and with recording the stream, so that a loaded machine
shows the recording's own cost.
"""
from __future__ import annotations

import logging
import sys
import time


def main() -> int:
    logging.disable(logging.WARNING)
    name = sys.argv[1] if len(sys.argv) > 1 else "llama-2-70b"
    seq = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    from memplan.allocator import parse_alloc_conf
    from memplan.allocator.device import device_replay
    from memplan.catalog import resolve_model
    from memplan.spec import TrainSpec
    from memplan.trace import run_trace

    model, spec = resolve_model(name), TrainSpec(seq_len=seq, gradient_checkpointing=True)
    plain = run_trace(model, spec)
    traced = run_trace(model, spec, record_allocations=True)
    print(f"{model.name} QLoRA seq {seq}: trace {plain.wall_s:.1f} s; with the allocation stream {traced.wall_s:.1f} s "
          f"({len(traced.allocations):,} events)")
    for conf in ("", "expandable_segments:True"):
        t0 = time.perf_counter()
        d = device_replay(traced.allocations, parse_alloc_conf(conf))
        r = d.replay
        print(f"  replay [{conf or 'defaults'}] {time.perf_counter() - t0:.2f} s: reserved "
              f"{r.peak_reserved_bytes / 2**30:.3f} GiB, allocated {r.peak_allocated_bytes / 2**30:.3f}, tensor bytes "
              f"{r.peak_requested_bytes / 2**30:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
