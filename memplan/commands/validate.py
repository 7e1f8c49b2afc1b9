"""`memplan validate --against trace`: the analytic estimate against the meta trace over a grid.

Grid: catalog models (or --models) × seq {512, 2048, 8192} × checkpointing {on, off} × bits {4, 16} × r {16, 64},
the other settings at their defaults. Each trace is cached as JSON under reports/.trace_cache/ keyed by the model
and the full TrainSpec, so reruns are incremental. Writes reports/estimate_vs_trace.csv: per row, each component's
trace and estimate bytes and their error as a share of the traced peak ((estimate - trace) / trace peak), and the
peak's relative error ((estimate - trace) / trace). The bar: |peak error| <= 3% on every row, <= 1% at the median.

`memplan validate --against profiles [PROFILES...]` compares the estimate and the trace with every measured profile
(default: profiles/; OOM and unfinished runs are left out) and writes reports/validation.csv (columns:
docs/calibration.md) and reports/validation.png (predicted vs measured, one point per configuration, +-5% band).
Bars, reported, not asserted: estimate vs max_memory_allocated |error| median <= 3%, worst <= 7%; device total vs
NVML process peak median <= 5%; trace vs max_memory_allocated median <= 2%. CPU profiles compare tensor bytes only
(the live-bytes tracker's peak); the device-level bars need GPU profiles.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

GRID = {"seq_len": (512, 2048, 8192), "gradient_checkpointing": (True, False), "bits": (4, 16), "lora_r": (16, 64)}
CACHE = Path("reports/.trace_cache")
COMPONENTS = ("weights_quantized", "quant_state", "weights_unquantized", "lora", "gradients", "optimizer_states",
              "activations", "logits_loss", "temporaries", "comm_buffers")
# Multi-GPU rows (--multi-gpu K): a seeded random sample over these, each traced as rank 0 on a fake process
# group (memplan.trace.distributed). ZeRO and FSDP1 are not traced (see that module).
MULTI_GPU_GRID = {"gpus": (2, 4, 8), "parallel": ("ddp", "fsdp", "fsdp-grad-op"), "bits": (4, 16),
                  "seq_len": (512, 2048, 8192), "gradient_checkpointing": (True, False), "lora_r": (16, 64),
                  "quant_storage": ("auto", "uint8"), "optimizer": ("adamw", "sgd"), "method": ("lora", "full")}
MULTI_GPU_MODELS = ("llama-3.2-1b", "llama-2-7b", "mistral-7b", "qwen2.5-7b", "mixtral-8x7b", "llama-2-70b")


def register(sub) -> None:
    p = sub.add_parser("validate", help="compare the estimate with the meta trace over a grid of models and settings",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--against", choices=["trace", "profiles"], default="trace",
                   help="trace: the meta trace over a grid | profiles: measured profiles (PROFILES, default profiles/)")
    p.add_argument("profiles", nargs="*", metavar="PROFILES",
                   help="with --against profiles: profile files or folders (default: profiles/)")
    p.add_argument("--models", help="comma-separated catalog names (default: the whole catalog)")
    p.add_argument("--seq", help="comma-separated sequence lengths (default: 512,2048,8192)")
    p.add_argument("--bits", help="comma-separated bits (default: 4,16)")
    p.add_argument("--r", help="comma-separated LoRA ranks (default: 16,64)")
    p.add_argument("--checkpointing", help="on,off (default: both)")
    p.add_argument("--random", type=int, metavar="N", help="with --against trace: instead of the grid, a seeded random "
                   "sample of N traced configurations over every training flag and the catalog's model types "
                   "(memplan/validation/sample.py); writes reports/estimate_vs_trace_random.csv and .png")
    p.add_argument("--layers", type=int, metavar="K", help="with --random or --multi-gpu: cap every model's decoder at K layers "
                   "(the same architecture, shallower; estimate and trace both see it): a trace costs time in "
                   "proportion to the layers (default: full depth)")
    p.add_argument("--multi-gpu", type=int, metavar="K", help="instead of the grid: K configurations drawn at random "
                   "(--seed) over GPUs 2/4/8 x ddp/fsdp/fsdp-grad-op x bits x seq x checkpointing x rank x "
                   "quant storage x optimizer x method, each traced as rank 0 on a fake process group; "
                   "writes reports/estimate_vs_trace_multi_gpu.csv")
    p.add_argument("--seed", type=int, default=0, help="the seed of --random's or --multi-gpu's sample (default "
                   "0; the committed reports say theirs)")
    p.add_argument("--jobs", type=int, default=1, help="parallel trace processes (default 1)")
    p.add_argument("--csv", help="output CSV path (default: reports/estimate_vs_trace.csv; with --against profiles "
                   "reports/validation.csv)")
    p.add_argument("--figure", help="with --against profiles: predicted vs measured figure (default: "
                   "reports/validation.png); with --random: peak error by model type (default: "
                   "reports/estimate_vs_trace_random.png); 'none' to skip")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--calibration", metavar="NAME|PATH", help="with --against profiles: this calibration for every "
                   "profile (default: the newest calibration of each profile's GPU)")
    c.add_argument("--no-calibration", action="store_true", help="with --against profiles: uncalibrated overheads")
    p.add_argument("--retrace", action="store_true", help="with --against profiles: run the trace again even when "
                   "the profile holds one")
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
    from memplan.spec import TrainSpec
    from memplan.validation.sample import resolve_sampled as resolve_model  # a catalog name, or one capped in depth

    train = TrainSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in train_dict.items()})
    path = Path(cache_dir) / model_name / f"{_key(model_name, train)}.json"
    if use_cache and path.is_file():
        return json.loads(path.read_text())
    from memplan.trace import run_trace

    try:
        if train.strategy != "none":  # one rank on a fake process group (trace/distributed.py)
            from memplan.trace.distributed import run_rank_trace

            result = run_rank_trace(resolve_model(model_name), train).to_dict()
        else:  # one steady-state step after a warm optimizer step: the peaks of two steps at half the cost
            result = run_trace(resolve_model(model_name), train, keep_timeline=False, steps=1,
                               warm_optimizer=True).to_dict()
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
           **{k: cfg[k] for k in ("gpus", "parallel", "quant_storage", "optimizer", "method") if k in cfg},
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
    from memplan.outputs import output_path

    default_csv = "reports/validation.csv" if args.against == "profiles" else "reports/estimate_vs_trace.csv"
    output_path(args.csv or default_csv, "--csv", make_parents=args.csv is None)
    if args.against == "profiles" and str(args.figure).lower() != "none":
        output_path(args.figure, "--figure", make_parents=args.figure == "reports/validation.png")
    if args.against == "profiles":
        return run_profiles(args)
    if args.profiles:
        from memplan.errors import MemplanError

        raise MemplanError("PROFILES are only read with --against profiles")
    if args.random is not None:
        from memplan.validation.against_trace import run_random

        return run_random(args)
    args.csv = args.csv or "reports/estimate_vs_trace.csv"
    import statistics

    from memplan.catalog import models, resolve_model
    from memplan.errors import MemplanError
    from memplan.estimate import estimate
    from memplan.spec import TrainSpec
    from memplan.validation.sample import capped_name, resolve_sampled

    names = [m["name"] for m in models().values()] if not args.models else \
        [resolve_model(n.strip()).name for n in args.models.split(",") if n.strip()]
    seqs = _parse(args.seq, int, GRID["seq_len"])
    bits = _parse(args.bits, int, GRID["bits"])
    ranks = _parse(args.r, int, GRID["lora_r"])
    ckpts = _parse(args.checkpointing, bool, GRID["gradient_checkpointing"])
    jobs = []
    if args.multi_gpu:
        import random

        rng = random.Random(args.seed)
        pool = [m.strip() for m in args.models.split(",")] if args.models else list(MULTI_GPU_MODELS)
        args.csv = args.csv if args.csv != "reports/estimate_vs_trace.csv" else "reports/estimate_vs_trace_multi_gpu.csv"
        while len(jobs) < args.multi_gpu:
            pick = {k: rng.choice(v) for k, v in MULTI_GPU_GRID.items()}
            name = capped_name(resolve_model(rng.choice(pool)).name, args.layers)
            try:
                train = TrainSpec(**pick)
            except MemplanError:
                continue  # a combination the libraries refuse (spec.py)
            jobs.append((name, train.to_dict(), args.cache, not args.no_cache))
    for name in ([] if args.multi_gpu else names):
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
        rows.append(compare(estimate(resolve_sampled(tr["model"]), train).to_dict(), tr))
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
        where = f" {worst.get('parallel')} x{worst.get('gpus')}" if args.multi_gpu else ""
        seed = f" (seed {args.seed})" if args.multi_gpu else ""
        out.print(f"{len(rows)} configurations{seed}: |peak error| median {med:.2%}, worst {abs(worst['peak_error']):.2%} "
                  f"({worst['model']}{where} seq {worst['seq_len']} bits {worst['bits']} r {worst['lora_r']} "
                  f"ckpt {'on' if worst['checkpointing'] else 'off'}); bar: every row <= 3%, median <= 1%: "
                  f"{'PASS' if med <= 0.01 and max(errs) <= 0.03 else 'FAIL'}")
        out.print(f"wrote {args.csv}")
    for f in failures:
        out.print(f"trace failed: {f['model']} {f['config']['seq_len']}: {f['error'][:200]}")
    return 0 if errs and not failures and statistics.median(errs) <= 0.01 and max(errs) <= 0.03 else 1


# ----------------------------------------------------------------------------------- --against profiles

PROFILE_COLUMNS = [
    "config", "profile", "device", "gpu", "model", "bits", "lora_r", "seq_len", "batch_size",
    "gradient_checkpointing", "peak_phase", "measured_allocated_peak_bytes", "measured_reserved_peak_bytes",
    "measured_nvml_used_peak_bytes", "measured_nvml_process_peak_bytes", "measured_tracker_peak_bytes",
    "measured_tensor_peak_bytes", "estimate_tensor_peak_bytes", "estimate_device_total_bytes", "trace_peak_bytes",
    "estimate_error_pct", "device_total_error_pct", "trace_error_pct", "calibration", "trace_source",
]
BARS = {"estimate_median": 3.0, "estimate_worst": 7.0, "device_total_median": 5.0, "trace_median": 2.0}


def config_label(profile: dict) -> str:
    t = profile["train"]
    parts = [profile["model"]["name"], f"{t.get('bits')}-bit", f"r{t.get('lora_r')}",
             f"b{t.get('batch_size')}×s{t.get('seq_len')}", "ckpt" if t.get("gradient_checkpointing") else "no-ckpt"]
    return " ".join(str(p) for p in parts)


def _trace_peak(profile: dict, spec, train, retrace: bool, cache: Path) -> tuple[int | None, str]:
    stored = (profile.get("comparison") or {}).get("trace") or {}
    if not retrace and isinstance(stored.get("peak_bytes"), int):
        return stored["peak_bytes"], "stored"
    blob = json.dumps({"model": profile["model"]["name"], "hf_config": profile["model"]["hf_config"],
                       "train": train.to_dict(), "v": 1}, sort_keys=True, default=str)
    path = cache / "profiles" / f"{hashlib.sha1(blob.encode()).hexdigest()[:16]}.json"
    if not retrace and path.is_file():
        return json.loads(path.read_text())["peak_bytes"], "cached"
    try:
        from memplan.trace import run_trace

        peak = int(run_trace(spec, train, real=False, keep_timeline=False).peak_bytes)
    except Exception as e:  # noqa: BLE001 - one failing trace must not stop the report
        return None, f"failed: {e.__class__.__name__}: {str(e)[:120]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"peak_bytes": peak}))
    return peak, "run"


def profile_row(profile: dict, overheads, retrace: bool, cache: Path) -> dict:
    from memplan.estimate import estimate
    from memplan.profile.compare import measured, pct
    from memplan.profile.runner import _model_spec, _train_spec

    spec, train = _model_spec({"model": profile["model"]}), _train_spec(profile["train"])
    cuda = profile["run"].get("device") == "cuda"
    tensor_peak, device_total, _ = measured(profile)
    peak = profile["measurements"].get("peak") or {}
    est = estimate(spec, train, overheads)
    trace_peak, trace_source = _trace_peak(profile, spec, train, retrace, cache)
    g = ((profile.get("environment") or {}).get("gpus") or [{}])[0] or {}
    t = profile["train"]
    return {
        "config": config_label(profile), "profile": Path(profile.get("_path", "")).name,
        "device": profile["run"].get("device"), "gpu": (g.get("catalog") or g.get("name") or "") if cuda else "",
        "model": profile["model"]["name"], "bits": t.get("bits"), "lora_r": t.get("lora_r"),
        "seq_len": t.get("seq_len"), "batch_size": t.get("batch_size"),
        "gradient_checkpointing": t.get("gradient_checkpointing"), "peak_phase": peak.get("phase"),
        "measured_allocated_peak_bytes": peak.get("allocated_bytes") if cuda else None,
        "measured_reserved_peak_bytes": peak.get("reserved_bytes") if cuda else None,
        "measured_nvml_used_peak_bytes": peak.get("nvml_used_bytes") if cuda else None,
        "measured_nvml_process_peak_bytes": device_total,
        "measured_tracker_peak_bytes": None if cuda else peak.get("tracker_bytes"),
        "measured_tensor_peak_bytes": tensor_peak,
        "estimate_tensor_peak_bytes": est.peak_bytes,
        "estimate_device_total_bytes": est.device_total_bytes if cuda else None,
        "trace_peak_bytes": trace_peak,
        "estimate_error_pct": pct(est.peak_bytes, tensor_peak),
        "device_total_error_pct": pct(est.device_total_bytes, device_total) if cuda else None,
        "trace_error_pct": pct(trace_peak, tensor_peak),
        "calibration": (overheads.calibration or "default") if cuda else "n/a (CPU)",
        "trace_source": trace_source,
    }


def bars(rows: list[dict]) -> list[str]:
    """The validation bars, in words (reported, not asserted)."""
    import statistics

    def stats(key, subset):
        vals = [abs(r[key]) for r in subset if r.get(key) is not None]
        return (statistics.median(vals), max(vals), len(vals)) if vals else None

    out = []
    for device, label in (("cuda", "GPU"), ("cpu", "CPU")):
        subset = [r for r in rows if r["device"] == device]
        if not subset:
            continue
        measure = "max_memory_allocated" if device == "cuda" else "the tracker's live tensor bytes"
        e = stats("estimate_error_pct", subset)
        if e:
            verdict = "PASS" if e[0] <= BARS["estimate_median"] and e[1] <= BARS["estimate_worst"] else "FAIL"
            out.append(f"{label} ({e[2]}): estimate vs {measure}: |error| median {e[0]:.2f}%, worst {e[1]:.2f}% "
                       f"(bar: median <= 3%, worst <= 7%: {verdict})")
        t = stats("trace_error_pct", subset)
        if t:
            out.append(f"{label} ({t[2]}): trace vs {measure}: |error| median {t[0]:.2f}%, worst {t[1]:.2f}% "
                       f"(bar: median <= 2%: {'PASS' if t[0] <= BARS['trace_median'] else 'FAIL'})")
        if device == "cuda":
            d = stats("device_total_error_pct", subset)
            if d:
                out.append(f"{label} ({d[2]}): device total vs NVML process peak: |error| median {d[0]:.2f}%, "
                           f"worst {d[1]:.2f}% (bar: median <= 5%: "
                           f"{'PASS' if d[0] <= BARS['device_total_median'] else 'FAIL'})")
            else:
                out.append(f"{label}: no NVML figures in these profiles: device total not compared")
        else:
            out.append("CPU profiles compare tensor bytes only: the device-level bars (reserved, NVML, device "
                       "total) need GPU profiles (memplan profile --device cuda)")
    return out


def run_profiles(args) -> int:
    import csv

    from rich.console import Console

    from memplan.calibrate import overheads_for, read_profile_args, warn
    from memplan.errors import MemplanError

    profiles, seen = read_profile_args(args.profiles)
    usable = [p for p in profiles if p["status"] == "ok" and (p["measurements"].get("peak") or {}).get("bytes")]
    left_out = len(profiles) - len(usable)
    if not usable:
        raise MemplanError(f"validate: no finished profile to compare ({seen} file(s) read, {len(profiles)} valid; "
                           "OOM and unfinished runs are left out)")
    cache = Path(args.cache)
    rows = []
    console = Console(stderr=True)
    for i, p in enumerate(usable):
        gpu = None
        if p["run"].get("device") == "cuda":
            g = ((p.get("environment") or {}).get("gpus") or [{}])[0] or {}
            gpu = g.get("catalog") or g.get("name")
        overheads, notes = overheads_for(gpu, args.calibration, args.no_calibration)
        warn(notes)
        rows.append(profile_row(p, overheads, args.retrace, cache))
        console.print(f"[dim]{i + 1}/{len(usable)} {rows[-1]['config']}[/]", highlight=False)
    path = Path(args.csv or "reports/validation.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PROFILE_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r[k] is None else r[k] for k in PROFILE_COLUMNS})
    out = Console()
    out.print(f"{len(rows)} profile(s) compared" + (f", {left_out} left out (OOM or unfinished)" if left_out else ""),
              highlight=False)
    for line in bars(rows):
        out.print(line, highlight=False)
    out.print(f"wrote {path}", highlight=False)
    figure = args.figure or "reports/validation.png"
    if str(figure).lower() != "none":
        from memplan.report.plots import predicted_vs_measured

        predicted_vs_measured(rows, figure)
        out.print(f"wrote {figure}", highlight=False)
    for r in rows:
        if r["trace_source"].startswith("failed"):
            out.print(f"trace {r['trace_source']} for {r['config']}", highlight=False)
    return 0
