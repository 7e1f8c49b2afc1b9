"""Fit the estimate's caching-allocator overhead per architecture from replays of traced steps.

    python scripts/fit_allocator_overhead.py [--seed 12] [--per-arch 2] [--max-params 9.5e9]

For every model type in the catalog (its models up to --max-params), a seeded random sample of configurations over
every training flag is traced on meta tensors (`memplan trace`), its allocation stream is replayed through the model
of PyTorch's caching allocator (memplan/allocator, torch 2.13 defaults, and expandable_segments:True), and

    allocator overhead = replayed max_memory_reserved - tensor peak - cuBLAS workspace

is recorded (reports/allocator_fit.csv, one row per configuration, written as it goes). The fitted figure per
architecture is the median of overhead / tensor peak (no intercept: the sample is too small to separate two terms);
model types whose models are all above --max-params use the pooled median. The result, with its provenance (seed,
configurations, library versions), goes to memplan/estimate/allocator_replay.json, which `memplan estimate` uses in
place of the flat default in overhead.json when no GPU calibration applies.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFS = {"default": "", "expandable": "expandable_segments:True"}
AXES = {
    "bits": [4, 16], "seq_len": [512, 1024, 2048, 4096], "batch_size": [1, 2, 4],
    "gradient_checkpointing": [True, False], "lora_r": [8, 16, 64], "lora_targets": ["all-linear", "qv", "attn"],
    "optimizer": ["adamw", "adamw-8bit"], "lora_dropout": [0.0, 0.05],
}


def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")}


def sample(seed: int, per_arch: int, max_params: float):
    from memplan.catalog import models, resolve_model

    by_type: dict = {}
    for name in sorted(models()):
        m = resolve_model(name)
        by_type.setdefault(m.model_type, []).append(m)
    rng = random.Random(seed)
    plan, skipped = [], {}
    for mtype in sorted(by_type):
        small = [m for m in by_type[mtype] if m.total_params <= max_params]
        if not small:
            skipped[mtype] = min(m.total_params for m in by_type[mtype])
            continue
        drawn = 0
        while drawn < per_arch:  # distinct configurations (a repeat would count one point twice)
            item = (rng.choice(small), {k: rng.choice(v) for k, v in AXES.items()})
            if any(item[0].name == m.name and item[1] == c for m, c in plan):
                continue
            plan.append(item)
            drawn += 1
    return plan, skipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--per-arch", type=int, default=2)
    ap.add_argument("--max-params", type=float, default=9.5e9)
    ap.add_argument("--csv", default=str(ROOT / "reports" / "allocator_fit.csv"))
    ap.add_argument("--out", default=str(ROOT / "memplan" / "estimate" / "allocator_replay.json"))
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from memplan.allocator import parse_alloc_conf
    from memplan.allocator.device import device_replay
    from memplan.spec import TrainSpec
    from memplan.trace import run_trace

    plan, skipped = sample(args.seed, args.per_arch, args.max_params)
    print(f"{len(plan)} configurations (seed {args.seed}); not fitted (all models > {args.max_params:.3g} params): "
          f"{', '.join(skipped) or 'none'}", flush=True)
    rows = []
    fields = ["model_type", "model", *AXES, "tensor_peak_bytes", "cublas_workspace_bytes",
              *(f"reserved_{k}_bytes" for k in CONFS), *(f"overhead_{k}_fraction" for k in CONFS), "trace_s"]
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for i, (model, cfg) in enumerate(plan):
            t0 = time.perf_counter()
            spec = TrainSpec(**cfg)
            tr = run_trace(model, spec, record_allocations=True, keep_timeline=False)
            row = {"model_type": model.model_type, "model": model.name, **cfg, "tensor_peak_bytes": tr.peak_bytes,
                   "trace_s": round(time.perf_counter() - t0, 1)}
            for key, text in CONFS.items():
                d = device_replay(tr.allocations, parse_alloc_conf(text), keep_timeline=False)
                row["cublas_workspace_bytes"] = d.cublas_workspace_bytes
                row[f"reserved_{key}_bytes"] = d.replay.peak_reserved_bytes
                over = d.replay.peak_reserved_bytes - tr.peak_bytes - d.cublas_workspace_bytes
                row[f"overhead_{key}_fraction"] = round(over / tr.peak_bytes, 6)
            rows.append(row)
            w.writerow(row)
            f.flush()
            print(f"[{i + 1}/{len(plan)}] {model.name} {cfg} peak {tr.peak_bytes / 2**30:.2f} GiB, overhead "
                  f"{row['overhead_default_fraction']:+.2%} / expandable {row['overhead_expandable_fraction']:+.2%} "
                  f"({row['trace_s']} s)", flush=True)
            del tr

    def summary(sel: list) -> dict:
        out = {}
        for key in CONFS:
            xs = [r[f"overhead_{key}_fraction"] for r in sel]
            out[key] = {"fraction": round(statistics.median(xs), 5), "min": min(xs), "max": max(xs), "n": len(xs)}
        return out

    archs = {t: summary([r for r in rows if r["model_type"] == t]) for t in sorted({r["model_type"] for r in rows})}
    doc = {
        "about": "caching-allocator overhead (replayed max_memory_reserved - tensor peak - cuBLAS workspace) as a "
                 "fraction of the tensor peak, median over traced configurations per model type; 'all' pools them "
                 "and serves model types that were not fitted",
        "method": "scripts/fit_allocator_overhead.py: meta trace (memplan/trace) -> allocation stream -> model of "
                  "torch 2.13 c10/cuda/CUDACachingAllocator.cpp (memplan/allocator), CUDA context and NCCL excluded",
        "seed": args.seed, "per_arch": args.per_arch, "max_params": args.max_params,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "stack": versions(), "alloc_confs": CONFS,
        "architectures": archs, "all": summary(rows), "not_fitted": sorted(skipped),
        "configurations": [{k: r[k] for k in ("model", *AXES)} for r in rows],
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out} and {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
