"""Benchmark the meta trace at scale: wall time and peak RSS of one traced QLoRA step (two steps, steady state).

    .venv/bin/python scripts/bench_trace.py [MODEL] [SEQ] [field=value ...]  # default: llama-2-70b 2048
    e.g. scripts/bench_trace.py llama-2-70b 2048 activation_offload=all loss=liger attention=flash_attention_2

The issue's bar: Llama-2-70B QLoRA, seq 2048, checkpointing on: <= 60 s wall and <= 4 GiB RSS on 2 CPU cores.
"""
from __future__ import annotations

import logging
import resource
import sys
import time


def main() -> int:
    logging.disable(logging.WARNING)
    name = sys.argv[1] if len(sys.argv) > 1 else "llama-2-70b"
    seq = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    t0 = time.perf_counter()
    from memplan.catalog import resolve_model
    from memplan.spec import TrainSpec
    from memplan.trace import run_trace

    model = resolve_model(name)
    extra = dict(a.split("=", 1) for a in sys.argv[3:])
    for key in ("liger", "gradient_checkpointing", "upcast"):
        if key in extra:
            extra[key] = extra[key].lower() in ("1", "on", "true")
    result = run_trace(model, TrainSpec(seq_len=seq, gradient_checkpointing=True).with_(**extra))
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss = usage.ru_maxrss * 1024  # Linux: KiB
    cpu = usage.ru_utime + usage.ru_stime  # CPU seconds: the figure that a loaded machine does not inflate
    print(f"{model.name} QLoRA seq {seq} {extra or ''}: peak {result.peak_bytes / 2**30:.3f} GiB "
          f"({result.peak_phase}); trace {result.wall_s:.1f} s, wall incl. imports {wall:.1f} s, "
          f"CPU {cpu:.1f} s, peak RSS {rss / 2**30:.2f} GiB")
    ok = wall <= 60 and rss <= 4 * 2**30
    print("bar (<= 60 s, <= 4 GiB):", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
