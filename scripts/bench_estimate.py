#!/usr/bin/env python
"""estimate() throughput: distinct configurations per second (no memo), per model, best of several repeats.

    python scripts/bench_estimate.py [--n 2000] [--repeat 3] [--profile]

The bar (the estimate issue): >= 10,000 configurations/s. --profile prints where the time goes (cProfile).
Each figure is given per second of wall time and per second of this thread's CPU time: on a shared machine the wall
rate measures the other jobs as much as memplan (the load average is printed).

What an estimate computes once per model and settings but not per shape (weights, adapters, optimizer states,
notes: memplan/estimate/__init__.py _settings) is reused across these configurations, as across a fit's, a sweep's
or a dataset's shapes; the grid below has 12 such settings per model (bits x checkpointing x optimizer), each
computed in the timed loop the first time. The multi-GPU rows draw GPU count and strategy too (a rank's view of
shards and buffers is per settings as well).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memplan.catalog import resolve_model  # noqa: E402
from memplan.estimate import estimate  # noqa: E402
from memplan.spec import TrainSpec  # noqa: E402

MODELS = ["qwen2.5-0.5b", "llama-3-8b", "llama-2-70b", "mixtral-8x7b", "llama-3.1-405b", "gemma-2-9b"]


def specs(n: int) -> list[TrainSpec]:
    """n distinct configurations: sequence length, batch, bits, checkpointing and optimizer all vary."""
    out = []
    for i in range(n):
        out.append(TrainSpec(seq_len=64 * (1 + i % 256), batch_size=1 + (i // 256) % 4, bits=(4, 8, 16)[i % 3],
                             gradient_checkpointing=bool(i % 2), optimizer=("adamw", "adamw-8bit")[(i // 7) % 2]))
    return out


MULTI_GPU_MODELS = ["llama-3-8b", "llama-2-70b", "mixtral-8x7b"]


def multi_gpu_specs(n: int) -> list[TrainSpec]:
    """n distinct multi-GPU configurations: the shape, bits, checkpointing, GPU count and strategy all vary."""
    return [TrainSpec(seq_len=64 * (1 + i % 256), batch_size=1 + (i // 256) % 4, bits=(4, 16)[i % 2],
                      gradient_checkpointing=bool((i // 5) % 2), gpus=(2, 4, 8)[(i // 3) % 3],
                      parallel=("fsdp", "zero3", "zero2", "ddp")[(i // 7) % 4]) for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    rates, cpu_rates = {}, {}
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name in MODELS + [f"{m} (multi-GPU)" for m in MULTI_GPU_MODELS]:
        model = resolve_model(name.split(" ")[0])
        grid = multi_gpu_specs(args.n) if "multi" in name else specs(args.n)
        estimate(model, grid[0])
        best = best_cpu = float("inf")
        for _ in range(args.repeat):
            from memplan.estimate import _SETTINGS

            _SETTINGS.clear()  # each repeat computes its settings afresh
            t0, c0 = time.perf_counter(), time.thread_time()
            for spec in grid:
                estimate(model, spec)
            best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.thread_time() - c0)
        rates[name], cpu_rates[name] = args.n / best, args.n / best_cpu
        print(f"{name:<28} {model.num_layers:>4} layers  {rates[name]:>9,.0f} configurations/s "
              f"({cpu_rates[name]:,.0f} per CPU-second)")
    for label, r in (("wall", rates), ("CPU", cpu_rates)):
        for kind, sub in (("one GPU", [v for k, v in r.items() if "multi" not in k]),
                          ("multi-GPU", [v for k, v in r.items() if "multi" in k])):
            print(f"{label}, {kind}: slowest {min(sub):,.0f}/s, median {sorted(sub)[len(sub) // 2]:,.0f}/s "
                  f"(bar: 10,000/s)")
    if args.profile:
        import cProfile
        import pstats

        model = resolve_model("llama-3-8b")
        prof = cProfile.Profile()
        prof.enable()
        for spec in grid:
            estimate(model, spec)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
