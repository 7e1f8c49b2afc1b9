#!/usr/bin/env python3
"""The GPU validation grid (run by scripts/gpu_validate.sh): real QLoRA profiles of the catalog models that matter
most, most valuable first, inside a time budget, bundled into OUTDIR after every configuration.

    python3 scripts/gpu_grid.py OUTDIR [--device cuda|cpu] [--budget S] [--plan] [--trace]

--device cpu is the dry run: the same plan, ordering, budget and bundling logic, with each catalog model scaled
down to a tiny model of the same architecture (2 layers, hidden 128) and the sequence lengths divided by 16, so
it finishes on a laptop CPU in a few minutes.

Why the order: the device lease is short, so the grid measures first what calibrates the most (one canonical
configuration per model), then the axes that move memory the most (sequence length, checkpointing, rank), and
stops starting new configurations when the next one would not finish within the budget. Every finished profile
is in OUTDIR/profiles.tar.gz at once (the device machine returns at most 8 files).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ["llama-2-7b", "llama-3-8b", "mistral-7b-v0.1", "llama-2-13b", "qwen2.5-14b"]
BIG = "llama-2-70b"
SEQS = [512, 2048, 4096]
BASE = {"seq_len": 2048, "gradient_checkpointing": True, "lora_r": 16}


def plan() -> list[tuple[str, dict]]:
    """(model, train overrides) in priority order, without duplicates."""
    order: list[tuple[str, dict]] = []

    def add(model, **over):
        item = (model, {**BASE, **over})
        if item not in order:
            order.append(item)

    # 1. one canonical QLoRA configuration per model (seq 2048, checkpointing, r 16), then the 70B one
    for m in MODELS:
        add(m)
    add(BIG, seq_len=512)
    # 2. sequence length (activations, logits) on the two most-used 7-8B models
    for m in MODELS[:2]:
        for s in (512, 4096):
            add(m, seq_len=s)
    # 3. checkpointing off: the whole activation stack, where estimates are most fragile
    for m in MODELS[:2]:
        for s in SEQS:
            add(m, seq_len=s, gradient_checkpointing=False)
    # 4. rank 64 (LoRA weights, gradients and Adam states x4)
    for m in MODELS:
        add(m, lora_r=64)
    # 5. the rest of the product, model by model
    for m in MODELS:
        for s in SEQS:
            for ck in (True, False):
                for r in (16, 64):
                    add(m, seq_len=s, gradient_checkpointing=ck, lora_r=r)
    return order


def tiny_config(hf_config: dict) -> dict:
    """The same architecture, scaled down (dry run on the CPU)."""
    cfg = dict(hf_config)
    heads = cfg.get("num_attention_heads", 4)
    kv = cfg.get("num_key_value_heads", heads)
    group = max(1, heads // max(kv, 1))
    cfg.update(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=max(1, 4 // min(group, 4)), vocab_size=min(cfg.get("vocab_size", 512), 1024))
    cfg.pop("head_dim", None)
    return cfg


def bundle(outdir: Path, profiles: Path) -> None:
    """OUTDIR/profiles.tar.gz: every profile so far (written to a temporary name, then renamed)."""
    tmp = outdir / ".profiles.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(profiles.glob("*.json")):
            tar.add(p, arcname=f"profiles/{p.name}")
    os.replace(tmp, outdir / "profiles.tar.gz")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("outdir")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole grid (default 480)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per configuration at most")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--load", default="direct", choices=("direct", "pretrained"))
    ap.add_argument("--trace", action="store_true", help="also run the meta trace in each child (CPU seconds)")
    ap.add_argument("--limit", type=int, help="at most this many configurations")
    ap.add_argument("--plan", action="store_true", help="print the ordered plan and exit")
    ap.add_argument("--work", default=None, help="where profiles are written before bundling (default: "
                    "OUTDIR/../memplan-gpu-work or /tmp)")
    args = ap.parse_args()

    from memplan.catalog import resolve_model
    from memplan.profile.grid import Config, run_grid
    from memplan.spec import TrainSpec

    items = plan()
    if args.limit:
        items = items[:args.limit]
    if args.plan:
        for i, (m, over) in enumerate(items, 1):
            print(f"{i:3d} {m:18s} seq {over['seq_len']:5d} ckpt {'on ' if over['gradient_checkpointing'] else 'off'}"
                  f" r {over['lora_r']}")
        return 0
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(os.environ.get("TMPDIR", "/tmp")) / "memplan-gpu-work"
    profiles = work / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    configs = []
    for model, over in items:
        spec = resolve_model(model)
        cfg = dict(spec.hf_config)
        name = spec.name
        if args.device == "cpu":
            cfg, name = tiny_config(cfg), f"{spec.name}-tiny"
            over = {**over, "seq_len": max(32, over["seq_len"] // 16)}
        train = TrainSpec(**over)
        run = {"steps": args.steps, "load_path": args.load, "seed": 0, "weights_dir": None, "weights_cache": None,
               "cpu_budget_bytes": None, "memory_fraction": None,
               "kernels": "gpu" if args.device == "cpu" else None}
        label = f"{name} s={train.seq_len} ckpt={'on' if train.gradient_checkpointing else 'off'} r={train.lora_r}"
        configs.append(Config(name, cfg, spec.source, train.to_dict(), args.device, run, label=label))
    print(f"gpu_grid: {len(configs)} configurations planned, budget {args.budget:.0f} s, device {args.device}",
          flush=True)
    t0 = time.time()
    summary = []

    def on_outcome(o):
        meas = (o.profile or {}).get("measurements") or {}
        peak = meas.get("peak") or {}
        est = ((o.profile or {}).get("comparison") or {}).get("estimate") or {}
        line = {"label": o.config.label, "status": o.status, "seconds": round(o.seconds, 1),
                "peak_phase": peak.get("phase"), "allocated_peak_bytes": peak.get("allocated_bytes"),
                "reserved_peak_bytes": peak.get("reserved_bytes"), "nvml_process_bytes": peak.get("nvml_process_bytes"),
                "tracker_peak_bytes": peak.get("tracker_bytes"), "estimate_peak_bytes": est.get("peak_bytes"),
                "estimate_error_pct": est.get("error_pct"), "tokens_per_s": meas.get("tokens_per_s"),
                "oom": (o.profile or {}).get("oom"), "log_tail": o.log_tail[-5:] if o.status == "crashed" else None}
        summary.append(line)
        print("gpu_grid: " + json.dumps(line), flush=True)
        bundle(outdir, profiles)
        (outdir / "summary.json").write_text(json.dumps({"elapsed_s": round(time.time() - t0, 1),
                                                         "results": summary}, indent=1))

    try:
        outcomes = run_grid(configs, profiles, outdir / "profiles.csv", force=False, timeout_s=args.timeout,
                            time_budget_s=args.budget, progress=False, on_outcome=on_outcome, trace=args.trace)
    finally:
        bundle(outdir, profiles)
    counts = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    print(f"gpu_grid: done in {time.time() - t0:.0f} s: {counts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
