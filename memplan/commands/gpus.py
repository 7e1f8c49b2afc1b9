"""`memplan gpus MODEL [training flags]`: every catalog GPU with its headroom or shortfall for one configuration,
sorted by headroom, and the longest sequence each one fits (with the safety margin). Imports no torch."""
from __future__ import annotations

import json
import sys

from memplan.options import add_train_flags, model_from_args

GIB = 2**30


def register(sub) -> None:
    from memplan.commands.fit import add_budget_flags

    p = sub.add_parser("gpus", help="every catalog GPU with its headroom or shortfall for a configuration",
                       description="Headroom (GPU memory − estimated device total) of every catalog GPU for one "
                                   "configuration, sorted. Sizes are GiB (2^30 bytes).")
    p.add_argument("model", nargs="?", help="catalog name or alias, config.json path or folder, or a hub id in the "
                   "local cache (optional with --from FILE: the model the config names)")
    add_budget_flags(p, gpu_required=False)
    add_train_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    from memplan.integrations.dataset import add_flags

    add_flags(p)
    p.set_defaults(func=run)


def verdicts(model, spec, margin: str | None = None, overheads=None) -> dict:
    """The estimate and, per GPU (headroom ascending), headroom, margin, verdict and the longest sequence that fits
    within the margin at the configuration's batch."""
    from memplan.commands.estimate import gpu_verdicts
    from memplan.plan import DEFAULT_MARGIN, Searcher, max_seq_len, parse_margin

    shared: dict = {}  # one memo for every GPU: only the budget differs
    rows = []
    for gpu, room in sorted(gpu_verdicts(_device_total(model, spec, overheads)), key=lambda x: (x[1], x[0].name)):
        m = parse_margin(margin if margin is not None else DEFAULT_MARGIN, gpu.memory_bytes)
        s = Searcher(model, gpu.memory_bytes - m, overheads)
        s.cache = shared
        seq = max_seq_len(s, spec)
        verdict = "fits" if room >= m else "tight" if room >= 0 else "short"
        rows.append({"gpu": gpu.name, "kind": gpu.kind, "memory_bytes": gpu.memory_bytes, "headroom_bytes": room,
                     "margin_bytes": m, "verdict": verdict, "max_seq_len": seq})
    return {"rows": rows}


def _device_total(model, spec, overheads=None) -> int:
    from memplan.estimate import estimate

    return estimate(model, spec, overheads).device_total_bytes


def run(args) -> int:
    from memplan.commands.fit import one_spec
    from memplan.estimate import estimate

    from memplan.calibrate import overheads_for, warn

    model = model_from_args(args)
    spec = one_spec(args, "gpus")
    overheads, notes = overheads_for()  # one calibration (the newest) for every GPU, else the defaults
    warn(notes)
    from memplan.integrations.dataset import from_args

    data, spec = from_args(args, model, spec, None, overheads)  # with --dataset: the dataset's peak step
    est = estimate(model, spec, overheads)
    rows = verdicts(model, spec, args.margin, overheads)["rows"]
    if args.json:
        json.dump({"model": model.name, "config": est.config, "device_total_bytes": est.device_total_bytes,
                   "overhead_source": est.overhead_source,
                   "peak_bytes": est.peak_bytes, "units": "bytes", "stack": est.to_dict()["stack"], "gpus": rows,
                   **({"dataset": data.to_dict()} if data else {})}, sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    from memplan.commands.estimate import describe, stack_line

    console = Console(highlight=False)
    console.print(f"[bold]{model.name}[/] · {describe(est.config)}")
    console.print(f"[dim]{stack_line(est.config)}[/]")
    console.print(f"device total {est.device_total_bytes / GIB:,.2f} GiB (tensor peak {est.peak_bytes / GIB:,.2f}); "
                  "GiB = 2^30 bytes")
    table = Table(title_justify="left", title="catalog GPUs by headroom (fits: headroom ≥ margin; tight: within it)")
    for c, j in (("GPU", "left"), ("kind", "left"), ("memory GiB", "right"), ("headroom GiB", "right"),
                 ("verdict", "left"), (f"max seq at batch {spec.batch_size}", "right")):
        table.add_column(c, justify=j)
    first_fit = next((r["gpu"] for r in rows if r["verdict"] == "fits"), None)
    for r in rows:
        color = {"fits": "green", "tight": "yellow", "short": "red"}[r["verdict"]]
        name = f"[bold]{r['gpu']}[/] ←smallest" if r["gpu"] == first_fit else r["gpu"]
        table.add_row(name, r["kind"], f"{r['memory_bytes'] / GIB:,.2f}",
                      f"[{color}]{r['headroom_bytes'] / GIB:+,.2f}[/]", f"[{color}]{r['verdict']}[/]",
                      f"{r['max_seq_len']:,}" if r["max_seq_len"] else "—")
    console.print(table)
    console.print(f"[dim]device overheads: {est.overhead_source}[/]")
    if data is not None:
        from memplan.integrations.dataset import print_plan

        print_plan(data)
    return 0
