"""`memplan report --html OUT.html MODEL... [training flags] [--gpu G] [--trace] [--profiles PATH...]`: one
self-contained HTML report (memplan/report/html.py) for a configuration, a grid (comma-separated flag values) or a
sweep (several models): component table and stacked bar, phases, every catalog GPU's headroom, fit's changes
(one configuration with --gpu), the trace's timeline (--trace: runs the meta trace, needs memplan[profile]),
estimate vs trace vs measured profiles (--profiles), and the provenance of every number. No CDN: plotly.min.js
from the plotly package is inlined, so the file works offline.
"""
from __future__ import annotations

import os
import shlex
import sys
from datetime import datetime, timezone

from memplan.commands.sweep import DEFAULT_GPUS
from memplan.options import (
    add_train_flags,
    grid_from_args,
    model_from_args,
    varying_fields,
)

MAX_TRACES = 24  # a trace takes seconds to tens of seconds each: a larger grid is a job for `memplan validate`


def register(sub) -> None:
    p = sub.add_parser("report", help="a self-contained HTML report of a configuration, grid or sweep",
                       description="Write one HTML file that works offline: the estimate's components, phases and "
                                   "GPU verdicts, optionally the exact trace and measured profiles, with the "
                                   "provenance of every number. Sizes are GiB (2^30 bytes).")
    p.add_argument("models", nargs="+", metavar="MODEL", help="catalog names, config.json paths or cached hub ids")
    add_train_flags(p)
    p.add_argument("--html", required=True, metavar="OUT.html", help="the report to write")
    p.add_argument("--gpu", help="judge fit against this GPU (one configuration) and use its calibration")
    p.add_argument("--trace", action="store_true",
                   help=f"also run the exact meta trace of each configuration (at most {MAX_TRACES}; needs the "
                        "profile extra: torch, transformers, peft, bitsandbytes)")
    p.add_argument("--profiles", action="append", metavar="PATH",
                   help="measured profiles (a file or a folder) to compare with the estimate and trace; repeatable")
    p.add_argument("--title", help="report title")
    p.set_defaults(func=run)


def _downsampled(result) -> list:
    from memplan.trace.report import downsample

    return [[e, b, p] for e, b, p in downsample(result.timeline, 4000)]


def _traces(pairs, estimates) -> list[dict]:
    from memplan.errors import MemplanError
    from memplan.profile.compare import pct

    if len(pairs) > MAX_TRACES:
        raise MemplanError(f"--trace runs one trace per configuration: {len(pairs)} given, at most {MAX_TRACES} "
                           "(`memplan validate --against trace` is made for grids)")
    try:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        logging.disable(logging.WARNING)
        from memplan.trace import run_trace
    except ImportError as e:
        raise MemplanError(f"--trace needs the profile extra ({e.name} is missing): pip install 'memplan[profile]'") from None
    out = []
    for i, ((model, spec), est) in enumerate(zip(pairs, estimates)):
        print(f"memplan report: tracing {i + 1}/{len(pairs)} {model.name} ...", file=sys.stderr, flush=True)
        result = run_trace(model, spec)
        d = result.to_dict()
        d["timeline"] = _downsampled(result)
        d["steps"] = result.steps
        d["estimate_error_pct"] = pct(est.peak_bytes, result.peak_bytes)
        out.append(d)
    return out


def _profiles(paths: list[str]) -> dict:
    from pathlib import Path

    from memplan.calibrate import overheads_for, read_profile_args, warn
    from memplan.commands.validate import CACHE, bars, profile_row
    from memplan.errors import MemplanError

    profiles, seen = read_profile_args(paths)
    usable = [p for p in profiles if p["status"] == "ok" and (p["measurements"].get("peak") or {}).get("bytes")]
    if not usable:
        raise MemplanError(f"--profiles: no finished profile ({seen} file(s) read, {len(profiles)} valid)")
    rows = []
    for p in usable:  # what `memplan validate --against profiles` computes, row for row
        gpu = None
        if p["run"].get("device") == "cuda":
            g = ((p.get("environment") or {}).get("gpus") or [{}])[0] or {}
            gpu = g.get("catalog") or g.get("name")
        overheads, notes = overheads_for(gpu)
        warn(notes)
        rows.append(profile_row(p, overheads, False, Path(CACHE)))
    return {"rows": rows, "bars": bars(rows)}


def command_line(args) -> str:
    """The command that writes this report again (from the parsed arguments, however main() was called)."""
    from memplan.options import FLAGS

    parts = ["memplan", "report", *args.models]
    for flag, field_name, _, _ in FLAGS:
        if getattr(args, field_name, None) is not None:
            parts += [flag, str(getattr(args, field_name))]
    if args.gpu:
        parts += ["--gpu", args.gpu]
    if args.trace:
        parts.append("--trace")
    if args.profiles:
        parts += ["--profiles", *args.profiles]
    parts += ["--html", args.html]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    from memplan import __version__
    from memplan.calibrate import overheads_for, warn
    from memplan.catalog import resolve_gpu
    from memplan.commands.estimate import _which, describe
    from memplan.estimate import SOURCES, estimate
    from memplan.outputs import output_path
    from memplan.report import provenance
    from memplan.report.figures import plotly_js
    from memplan.report.html import render
    from memplan.report.verdicts import gpu_verdicts

    out = output_path(args.html, "--html")
    specs = grid_from_args(args)
    models = [model_from_args(args, ref) for ref in args.models]
    gpu = resolve_gpu(args.gpu) if args.gpu else None
    overheads, cal_notes = overheads_for(gpu.name if gpu else None)
    warn(cal_notes)
    pairs = [(m, s) for m in models for s in specs]
    results = [estimate(m, s, overheads) for m, s in pairs]
    estimates = []
    for (m, _), r in zip(pairs, results):
        r.notes.extend(n for n in cal_notes if n.startswith("ignoring"))
        estimates.append(r.to_dict())
    gpus = [gpu_verdicts(m, s, r, overheads) for (m, s), r in zip(pairs, results)]
    doc = {"estimates": estimates, "gpus": gpus}
    if gpu and len(pairs) == 1:
        from memplan.errors import MemplanError
        from memplan.plan import fit, make_budget

        budget = make_budget(gpu.name)
        try:
            doc["fit"] = fit(pairs[0][0], pairs[0][1], budget, overheads).to_dict()
        except MemplanError as e:
            doc["fit"] = {"error": str(e), "budget": budget.to_dict()}
    if args.trace:
        doc["traces"] = _traces(pairs, results)
    if args.profiles:
        doc["profiles"] = _profiles(args.profiles)
    stack = provenance.stack(estimates[0])
    libs = ", ".join(f"{k} {v}" for k, v in stack["libraries"].items())
    lines = [f"memplan {__version__}: the analytic estimate (memplan/estimate/; each component's module cites the "
             "paper table or library source of its formula)",
             f"estimate's library stack: {libs} ({stack['source']})",
             f"device overheads: {_which(overheads, cal_notes)}",
             "GPU memory sizes: memplan/catalog/gpus.json (each GPU's source is in the GPU table)"]
    lines += [f"model {m.name}: architecture from {m.source}" for m in models]
    if args.trace:
        t = provenance.installed_stack()
        lines.append("trace: one real training step of " + ", ".join(f"{k} {v}" for k, v in t["libraries"].items())
                     + " on meta tensors, every live tensor byte counted (memplan/trace/; docs/trace.md)")
    if args.profiles:
        lines.append("profiles: measured runs (docs/profile.md), compared as `memplan validate --against profiles` "
                     "does; each profile file names its hardware and library versions")
    if gpu and len(pairs) == 1:
        lines.append("fit: memplan/plan.py (each change's cost names its source)")
    title = args.title or (f"memplan report: {models[0].name}" if len(models) == 1 else
                           f"memplan report: {len(models)} models")
    doc["meta"] = {
        "title": title, "memplan_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(args),
        "sources": SOURCES, "varying": varying_fields(specs), "provenance": lines,
        "describe": [describe(e["config"]) for e in estimates],
        "line_gpus": [gpu.name] if gpu else DEFAULT_GPUS.split(","),  # drawn on a sequence-length sweep's lines
    }
    js_path = plotly_js()
    if js_path is None:
        print("memplan report: warning: plotly is not installed, the report has tables only "
              "(pip install 'memplan[web]')", file=sys.stderr)
    js = js_path.read_text(encoding="utf-8") if js_path else None
    if js:
        from memplan.report.figures import plotly_js_version

        lines.append(f"figures: plotly.js {plotly_js_version(js)}, inlined from {js_path} (no network needed)")
    text = render(doc, js)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out} ({len(estimates)} configuration(s), {len(text) / 2**20:.1f} MiB, self-contained)")
    return 0
