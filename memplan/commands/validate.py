"""`memplan validate --against trace`: the analytic estimate against the meta trace over a grid.

Grid: catalog models (or --models) × seq {512, 2048, 8192} × checkpointing {on, off} × bits {4, 16} × r {16, 64},
the other settings at their defaults. Each trace is cached as JSON under reports/.trace_cache/ keyed by the model
and the full TrainSpec, so reruns are incremental. Writes reports/estimate_vs_trace.csv: per row, each component's
trace and estimate bytes and their error as a share of the traced peak ((estimate - trace) / trace peak), and the
peak's relative error ((estimate - trace) / trace). The bar: |peak error| <= 3% on every row, <= 1% at the median.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

GRID = {"seq_len": (512, 2048, 8192), "gradient_checkpointing": (True, False), "bits": (4, 16), "lora_r": (16, 64)}
CACHE = Path("reports/.trace_cache")
COMPONENTS = ("weights_quantized", "quant_state", "weights_unquantized", "lora", "gradients", "optimizer_states",
              "activations", "logits_loss", "temporaries")


def register(sub) -> None:
    p = sub.add_parser("validate", help="compare the estimate with the meta trace over a grid of models and settings",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--against", choices=["trace"], default="trace", help="what to validate against (trace)")
    p.add_argument("--models", help="comma-separated catalog names (default: the whole catalog)")
    p.add_argument("--seq", help="comma-separated sequence lengths (default: 512,2048,8192)")
    p.add_argument("--bits", help="comma-separated bits (default: 4,16)")
    p.add_argument("--r", help="comma-separated LoRA ranks (default: 16,64)")
    p.add_argument("--checkpointing", help="on,off (default: both)")
    p.add_argument("--jobs", type=int, default=1, help="parallel trace processes (default 1)")
    p.add_argument("--csv", default="reports/estimate_vs_trace.csv", help="output CSV path")
    p.add_argument("--cache", default=str(CACHE), help="trace cache folder (JSON per configuration)")
    p.add_argument("--no-cache", action="store_true", help="retrace even when a cached trace exists")
    p.set_defaults(func=run)


def _key(model_name: str, train) -> str:
    blob = json.dumps({"model": model_name, "train": train.to_dict(), "v": 1}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _trace_one(job):
    """Worker: trace one configuration (cached), return the trace dict."""
    import logging

    logging.disable(logging.WARNING)
    model_name, train_dict, cache_dir, use_cache = job
    from memplan.catalog import resolve_model
    from memplan.spec import TrainSpec

    train = TrainSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in train_dict.items()})
    path = Path(cache_dir) / model_name / f"{_key(model_name, train)}.json"
    if use_cache and path.is_file():
        return json.loads(path.read_text())
    from memplan.trace import run_trace

    try:
        result = run_trace(resolve_model(model_name), train, keep_timeline=False).to_dict()
    except Exception as e:  # noqa: BLE001 - one failing configuration must not stop the grid
        return {"model": model_name, "config": train.to_dict(), "error": f"{e.__class__.__name__}: {e}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def _parse(text, cast, default):
    if text is None:
        return default
    from memplan.options import _bool

    cast = _bool if cast is bool else cast
    return tuple(cast(v.strip()) for v in text.split(",") if v.strip())


def compare(est: dict, tr: dict) -> dict:
    """One CSV row: trace vs estimate, per component and for the peak."""
    cfg = tr["config"]
    row = {"model": tr["model"], "seq_len": cfg["seq_len"], "checkpointing": cfg["gradient_checkpointing"],
           "bits": cfg["bits"], "lora_r": cfg["lora_r"], "attention": cfg["attention"],
           "trace_peak_bytes": tr["peak_bytes"], "estimate_peak_bytes": est["peak_bytes"],
           "peak_error": (est["peak_bytes"] - tr["peak_bytes"]) / tr["peak_bytes"],
           "trace_peak_phase": tr["peak_phase"], "estimate_peak_phase": est["peak_phase"]}
    for c in COMPONENTS:
        t, e = tr["components"].get(c, 0), est["components"].get(c, 0)
        row[f"trace_{c}"] = t
        row[f"estimate_{c}"] = e
        row[f"error_{c}"] = (e - t) / tr["peak_bytes"]
    for p in ("load", "forward", "backward", "optimizer"):
        t, e = tr["phases"].get(p, 0), est["phases"].get(p, 0)
        row[f"phase_error_{p}"] = (e - t) / t if t else 0.0
    return row


def run(args) -> int:
    import statistics

    from memplan.catalog import models, resolve_model
    from memplan.errors import MemplanError
    from memplan.estimate import estimate
    from memplan.spec import TrainSpec

    names = [m["name"] for m in models().values()] if not args.models else \
        [resolve_model(n.strip()).name for n in args.models.split(",") if n.strip()]
    seqs = _parse(args.seq, int, GRID["seq_len"])
    bits = _parse(args.bits, int, GRID["bits"])
    ranks = _parse(args.r, int, GRID["lora_r"])
    ckpts = _parse(args.checkpointing, bool, GRID["gradient_checkpointing"])
    jobs = []
    for name in names:
        for s in seqs:
            for c in ckpts:
                for b in bits:
                    for r in ranks:
                        train = TrainSpec(seq_len=s, gradient_checkpointing=c, bits=b, lora_r=r)
                        jobs.append((name, train.to_dict(), args.cache, not args.no_cache))
    if not jobs:
        raise MemplanError("validate: the grid is empty")
    from rich.console import Console

    console = Console(stderr=True)
    results = []
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=8) as pool:
            for i, res in enumerate(pool.imap(_trace_one, jobs)):
                results.append(res)
                console.print(f"[dim]{i + 1}/{len(jobs)} {res['model']}[/]", highlight=False)
    else:
        for i, job in enumerate(jobs):
            results.append(_trace_one(job))
            console.print(f"[dim]{i + 1}/{len(jobs)} {job[0]}[/]", highlight=False)
    rows, failures = [], []
    for tr in results:
        if "error" in tr:
            failures.append(tr)
            continue
        train = TrainSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in tr["config"].items()})
        rows.append(compare(estimate(resolve_model(tr["model"]), train).to_dict(), tr))
    if rows:
        import csv

        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for row in rows:
                w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    errs = [abs(r["peak_error"]) for r in rows]
    out = Console()
    if errs:
        worst = max(rows, key=lambda r: abs(r["peak_error"]))
        med = statistics.median(errs)
        out.print(f"{len(rows)} configurations: |peak error| median {med:.2%}, worst {abs(worst['peak_error']):.2%} "
                  f"({worst['model']} seq {worst['seq_len']} bits {worst['bits']} r {worst['lora_r']} "
                  f"ckpt {'on' if worst['checkpointing'] else 'off'}); bar: every row <= 3%, median <= 1%: "
                  f"{'PASS' if med <= 0.01 and max(errs) <= 0.03 else 'FAIL'}")
        out.print(f"wrote {args.csv}")
    for f in failures:
        out.print(f"trace failed: {f['model']} {f['config']['seq_len']}: {f['error'][:200]}")
    return 0 if errs and not failures and statistics.median(errs) <= 0.01 and max(errs) <= 0.03 else 1
