#!/usr/bin/env python3
"""GPU check of the caching-allocator model: measured vs predicted max_memory_reserved, with and without
expandable segments (run by scripts/gpu_validate.sh when ALLOC_CHECK=1; needs a CUDA GPU).

    python3 scripts/gpu_allocator.py OUTDIR [--budget S] [--device cuda|cpu]

For each configuration and each PYTORCH_CUDA_ALLOC_CONF ("" and "expandable_segments:True") it runs one real
profile (`memplan profile` machinery, its own process: the allocator reads the variable at start) with
MEMPLAN_SNAPSHOT set, so the child records torch.cuda.memory._record_memory_history and dumps the snapshot
(OUTDIR/snapshots/*.pickle, bundled into OUTDIR/snapshots.tar.gz). Then, on the CPU:
  - the snapshot is replayed (`memplan replay`): the model fed the real allocation stream, predicted vs the real
    allocator's reserved (its segment events) — the allocator model alone;
  - the same configuration is traced on meta and replayed (`memplan trace --allocator`): predicted vs measured
    max_memory_reserved — trace and allocator model together.
OUTDIR/allocator_check.json holds one row per run. Target (issue #12): median |error| <= 3%.
--device cpu is a dry run of the bookkeeping (tiny models; no snapshots: the CPU has no caching allocator).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = [  # (model, train overrides): IBM's Mistral-7B QLoRA row first, then two common recipes
    ("mistral-7b-v0.1", {"seq_len": 4096, "batch_size": 4, "lora_targets": "attn", "lora_dropout": 0.1}),
    ("llama-3-8b", {"seq_len": 2048}),
    ("llama-2-7b", {"seq_len": 2048, "gradient_checkpointing": False}),
]
CONFS = {"default": "", "expandable": "expandable_segments:True"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("outdir")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the profiles (default 300)")
    ap.add_argument("--timeout", type=float, default=150.0)
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    from memplan.allocator import parse_alloc_conf, replay
    from memplan.allocator.device import device_replay
    from memplan.allocator.snapshot import read_snapshot, stream_of
    from memplan.catalog import resolve_model
    from memplan.profile.grid import Config, run_grid
    from memplan.spec import TrainSpec
    from memplan.trace import run_trace

    out = Path(args.outdir)
    snaps = out / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "memplan-alloc-work"
    work.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    for model_name, over in CONFIGS:
        spec = resolve_model(model_name)
        if args.device == "cpu":  # dry run: the same architecture, tiny (scripts/gpu_grid.py tiny_config)
            sys.path.insert(0, str(ROOT / "scripts"))
            from gpu_grid import tiny_config

            tiny = work / f"{model_name}-tiny" / "config.json"
            tiny.parent.mkdir(parents=True, exist_ok=True)
            tiny.write_text(json.dumps(tiny_config(spec.hf_config)))
            spec = resolve_model(str(tiny))
            over = {**over, "seq_len": max(32, over["seq_len"] // 16)}
        train = TrainSpec(**over)
        traced = None
        for key, text in CONFS.items():
            left = args.budget - (time.time() - t0)
            if left < 30:
                print(f"gpu_allocator: budget spent, stopping before {model_name} {key}", flush=True)
                break
            snap = snaps / f"{model_name}-{key}.pickle"
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = text
            if args.device == "cuda":
                os.environ["MEMPLAN_SNAPSHOT"] = str(snap)
            run = {"steps": 2, "load_path": "direct", "seed": 0, "weights_dir": None, "weights_cache": None,
                   "cpu_budget_bytes": None, "memory_fraction": None, "kernels": None}
            cfg = Config(spec.name, dict(spec.hf_config), spec.source, train.to_dict(), args.device, run,
                         label=f"{model_name} {key}")
            outcomes = run_grid([cfg], work / key, work / f"{key}.csv", force=True,
                                timeout_s=min(args.timeout, left), time_budget_s=left, progress=False, trace=False)
            os.environ.pop("MEMPLAN_SNAPSHOT", None)
            prof = (outcomes[0].profile or {}) if outcomes else {}
            meas = prof.get("measurements") or {}
            measured = max([(p or {}).get("reserved_peak_bytes") or 0 for p in (meas.get("phases") or {}).values()],
                           default=0) or None
            row = {"model": model_name, "train": over, "alloc_conf": text, "status": prof.get("status"),
                   "measured_max_reserved_bytes": measured,
                   "measured_max_allocated_bytes": (meas.get("peak") or {}).get("allocated_bytes")}
            if snap.exists():
                s = stream_of(read_snapshot(str(snap)))
                r = replay(s.stream, parse_alloc_conf(text))
                row.update(snapshot_replay_reserved_bytes=r.peak_reserved_bytes,
                           snapshot_measured_reserved_bytes=s.measured_peak_reserved)
            if traced is None:
                traced = run_trace(spec, train, record_allocations=True, keep_timeline=False)
            d = device_replay(traced.allocations, parse_alloc_conf(text), keep_timeline=False)
            row.update(trace_peak_bytes=traced.peak_bytes, trace_replay_reserved_bytes=d.replay.peak_reserved_bytes)
            if measured:
                row["trace_replay_error"] = d.replay.peak_reserved_bytes / measured - 1
                if "snapshot_replay_reserved_bytes" in row:
                    row["snapshot_replay_error"] = row["snapshot_replay_reserved_bytes"] / measured - 1
            rows.append(row)
            print("gpu_allocator: " + json.dumps(row), flush=True)
            (out / "allocator_check.json").write_text(json.dumps({"rows": rows}, indent=1))
    with tarfile.open(out / "snapshots.tar.gz", "w:gz") as tar:
        for p in sorted(snaps.glob("*.pickle")):
            tar.add(p, arcname=p.name)
    for k in ("trace_replay_error", "snapshot_replay_error"):
        errs = [abs(r[k]) for r in rows if r.get(k) is not None]
        if errs:
            print(f"gpu_allocator: median |{k}| {statistics.median(errs):.2%} over {len(errs)} runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
