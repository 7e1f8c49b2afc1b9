#!/usr/bin/env python
"""Wall time of `memplan fit` and the number of configurations its search covers.

    python scripts/bench_fit.py [--repeat 5]

For each case: the best-of-N in-process time of plan.fit() (a fresh search each time: no memo carried over), the
configurations the search decided (estimated or by monotonicity) and how many estimates it ran; then the cold
wall time of the whole CLI (`python -m memplan fit ... --json`, interpreter start and imports included).
The bar (issue 5): <= 100 ms in process while covering >= 10,000 configurations.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memplan.catalog import resolve_model  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.plan import fit, make_budget  # noqa: E402
from memplan.spec import TrainSpec  # noqa: E402

CASES = [
    ("llama-3-8b", "rtx-4090", {}),
    ("llama-3-8b", "rtx-4090", {"bits": 16, "batch_size": 8, "seq_len": 8192, "gradient_checkpointing": False}),
    ("llama-2-13b", "rtx-3060", {"bits": 16, "batch_size": 2, "seq_len": 4096, "gradient_checkpointing": False}),
    ("llama-2-70b", "a100-80gb", {"seq_len": 4096}),
    ("llama-3-8b", "a100-80gb", {"bits": 16, "batch_size": 8, "seq_len": 4096, "attention": "eager",
                                 "gradient_checkpointing": False}),
    ("mixtral-8x7b", "h200", {}),
    ("llama-3.1-405b", "b200", {"seq_len": 8192}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    worst = 0.0
    print(f"{'model':<16} {'gpu':<10} {'change':<58} {'fits':>5} {'configs':>9} {'estimates':>9} {'best ms':>8}")
    for name, gpu, change in CASES:
        model, budget, spec = resolve_model(name), make_budget(gpu=gpu), TrainSpec(**change)
        times, r = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            try:
                r = fit(model, spec, budget)
            except MemplanError:
                r = None
            times.append(time.perf_counter() - t0)
        best = min(times)
        worst = max(worst, best)
        desc = ",".join(f"{k}={v}" for k, v in change.items()) or "defaults"
        if r is None:
            print(f"{name:<16} {gpu:<10} {desc:<58} {'error':>5} {'':>9} {'':>9} {best * 1000:8.1f}")
            continue
        print(f"{name:<16} {gpu:<10} {desc:<58} {str(r.fits):>5} {r.configurations_searched:>9,} "
              f"{r.estimates:>9} {best * 1000:8.1f}")
    cmd = [sys.executable, "-m", "memplan", "fit", "llama-3-8b", "--gpu", "rtx-4090", "--json"]
    cold = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
        cold.append(time.perf_counter() - t0)
    print(f"slowest case (best of {args.repeat}): {worst * 1000:.1f} ms in process")
    print(f"cold CLI `{' '.join(cmd[1:])}`: best {min(cold) * 1000:.0f} ms, worst {max(cold) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
