"""Estimate vs exact trace under transformers 4: a seeded random sample over every training flag.

Run it in the transformers-4 environment (scripts/setup_tf4_env.sh), where the trace runs transformers 4.57.6 and
the estimate's default (TrainSpec.transformers = the installed major) is 4:

    PYTHONPATH=$PWD ~/.cache/memplan/venv-tf4/bin/python scripts/validate_tf4.py --n 16 --seed 4

Writes reports/estimate_vs_trace_tf4.csv (the columns of `memplan validate --against trace`, plus the sampled
flags and the stack) and prints the median and worst |peak error|.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

# Small dense models of each masking path, and MoE models of both 4.x block types (Mixtral, Qwen2-MoE).
CACHE = Path.home() / ".cache" / "memplan" / "validate_tf4"  # trace results, keyed by model, settings and stack
MODELS = ["qwen2.5-0.5b", "llama-3.2-1b", "mistral-7b", "qwen1.5-moe-a2.7b", "mixtral-8x7b"]
FLAGS = {
    "bits": [4, 4, 16],  # 8-bit: bitsandbytes' int8_vectorwise_quant has no meta kernel (the meta trace fails, under 5.x too)
    "gradient_checkpointing": [True, False],
    "seq_len": [256, 512, 1024, 2048, 4096],
    "batch_size": [1, 2],
    "lora_r": [8, 16, 64],
    "lora_targets": ["qv", "attn", "all-linear"],
    "lora_dropout": [0.0, 0.05, 0.1],
    "optimizer": ["adamw", "adamw-8bit", "sgd"],
    "attention": ["sdpa", "sdpa", "eager"],
    "upcast": [True, False],
}


def sample(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        model = MODELS[i % len(MODELS)]
        flags = {k: rng.choice(v) for k, v in FLAGS.items()}
        if model == "mixtral-8x7b":  # ~2 min a trace here: keep it to short, checkpointed runs
            flags.update(seq_len=min(flags["seq_len"], 1024), gradient_checkpointing=True, batch_size=1)
        if flags["attention"] == "eager" or not flags["gradient_checkpointing"]:
            flags["seq_len"] = min(flags["seq_len"], 1024)  # eager scores / every layer's saved set: RAM-bound
        out.append((model, flags))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--out", default="reports/estimate_vs_trace_tf4.csv")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from memplan.catalog import resolve_model
    from memplan.commands.validate import compare
    from memplan.estimate import estimate
    from memplan.spec import TrainSpec
    from memplan.stack import describe, installed_major, stack
    from memplan.trace import run_trace

    from memplan.errors import MemplanError
    from memplan.outputs import output_path

    if installed_major() != 4:
        print("run this in the transformers-4 environment (scripts/setup_tf4_env.sh)", file=sys.stderr)
        return 2
    try:
        out_path = output_path(args.out, "--out", make_parents=True)
    except MemplanError as e:
        print(f"validate_tf4: error: {e}", file=sys.stderr)
        return 2
    rows = []
    for model_name, flags in sample(random.Random(args.seed), args.n):
        model = resolve_model(model_name)
        train = TrainSpec(**flags)
        t0 = time.perf_counter()
        key = hashlib.sha256(json.dumps([model_name, train.to_dict(), stack(0)], sort_keys=True,
                                        default=str).encode()).hexdigest()[:20]
        cached = CACHE / f"{key}.json"
        if cached.exists():  # the trace does not depend on the estimate: rerunning after an estimator change is fast
            tr = json.loads(cached.read_text())
        else:
            tr = run_trace(model, train, keep_timeline=False).to_dict()
            CACHE.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(tr))
        est = estimate(model, train).to_dict()
        row = compare(est, tr)
        row.update({k: v for k, v in train.to_dict().items() if k not in row})
        row.update(seed=args.seed, trace_s=round(time.perf_counter() - t0, 1),
                   **{f"{p}_version": stack(0)[p] for p in ("transformers", "peft", "bitsandbytes", "torch")})
        rows.append(row)
        print(f"{model_name:18} {train.bits:>2}-bit ckpt={'on ' if train.gradient_checkpointing else 'off'} "
              f"b{train.batch_size}×{train.seq_len:<5} {train.lora_targets:10} {train.attention:5} "
              f"trace {tr['peak_bytes'] / 2**30:8.3f} GiB  estimate {est['peak_bytes'] / 2**30:8.3f} GiB  "
              f"{row['peak_error']:+.2%}", flush=True)
    with open(out_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    errs = [abs(r["peak_error"]) for r in rows]
    print(f"{len(rows)} configurations, seed {args.seed}, {describe(stack(0))}: median |peak error| "
          f"{statistics.median(errs):.2%}, worst {max(errs):.2%}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
