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
    p.add_argument("--max-gpus", type=int, default=8, metavar="N",
                   help="also plan multi-GPU runs: for each GPU type the smallest count of 1, 2, 4, 8 (up to N) and "
                        "strategy (FSDP2, ZeRO-3, then CPU offload) that fits (default 8; 1 turns it off)")
    p.add_argument("--json", action="store_true", help="print JSON")
    from memplan.integrations.dataset import add_flags

    add_flags(p)
    p.set_defaults(func=run)


def verdicts(model, spec, margin: str | None = None, overheads=None, device_total: int | None = None) -> dict:
    """The estimate and, per GPU (headroom ascending), headroom, margin, verdict and the longest sequence that fits
    within the margin at the configuration's batch (device_total: the configuration's, when already estimated)."""
    from memplan.commands.estimate import gpu_verdicts
    from memplan.plan import DEFAULT_MARGIN, Searcher, max_seq_len, parse_margin

    shared: dict = {}  # one memo for every GPU: only the budget differs
    rows = []
    if device_total is None:
        device_total = _device_total(model, spec, overheads)
    for gpu, room in sorted(gpu_verdicts(device_total), key=lambda x: (x[1], x[0].name)):
        m = parse_margin(margin if margin is not None else DEFAULT_MARGIN, gpu.memory_bytes)
        s = Searcher(model, gpu.memory_bytes - m, overheads)
        s.cache = shared
        seq = max_seq_len(s, spec)
        verdict = "fits" if room >= m else "tight" if room >= 0 else "short"
        rows.append({"gpu": gpu.name, "kind": gpu.kind, "memory_bytes": gpu.memory_bytes, "headroom_bytes": room,
                     "margin_bytes": m, "verdict": verdict, "max_seq_len": seq})
    return {"rows": rows}


COUNTS = (1, 2, 4, 8)
# (parallel, offload), tried in this order at each count: sharding first, offload only when no count fits.
SHARDED = (("fsdp", "none"), ("zero3", "none"))
OFFLOADED = (("zero3", "optimizer"), ("fsdp", "params"), ("zero3", "params"))


def multi_gpu_plan(model, spec, max_gpus: int, margin: str | None = None, overheads=None,
                   known: dict | None = None) -> list[dict]:
    """Per catalog GPU: the smallest GPU count (and the strategy) whose per-rank device total fits within the
    margin. The estimates do not depend on the GPU, so each (count, strategy) is estimated once; `known` maps
    TrainSpecs already estimated (the configuration itself) to their estimates."""
    from memplan.catalog import gpu_list
    from memplan.errors import MemplanError
    from memplan.estimate import estimate
    from memplan.plan import DEFAULT_MARGIN, parse_margin

    if max_gpus < 1:
        raise MemplanError(f"--max-gpus must be at least 1, got {max_gpus}")
    counts = [c for c in COUNTS if c <= max_gpus]
    candidates = []  # (count, parallel, offload, estimate), cheapest first
    for pass_ in (SHARDED, OFFLOADED):
        for n in counts:
            options = [("none", "none")] if n == 1 and pass_ is SHARDED else []
            options += [] if (n == 1 and pass_ is SHARDED and spec.gpus == 1) else list(pass_)
            for par, off in options:
                try:
                    t = spec.with_(gpus=n, parallel=par if (n > 1 or par != "none") else "auto", offload=off,
                                   quant_storage="auto")
                except MemplanError:
                    continue
                e = (known or {}).get(t) or estimate(model, t, overheads)
                candidates.append((n, par, off, e))
    rows = []
    for gpu in gpu_list():
        m = parse_margin(margin if margin is not None else DEFAULT_MARGIN, gpu.memory_bytes)
        hit = next((c for c in candidates if c[3].device_total_bytes <= gpu.memory_bytes - m), None)
        row = {"gpu": gpu.name, "memory_bytes": gpu.memory_bytes, "gpus": None, "parallel": None, "offload": None,
               "device_total_bytes": None, "comm_bytes_per_step": None, "host_bytes": None}
        if hit:
            n, par, off, e = hit
            row.update(gpus=n, parallel=par, offload=off, device_total_bytes=e.device_total_bytes,
                       comm_bytes_per_step=e.parallel.get("comm_bytes_per_step", 0), host_bytes=e.host_bytes)
        rows.append(row)
    return rows


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
    data = None
    if any(getattr(args, f, None) is not None for f in ("dataset", "tokenizer", "text_field", "order", "packing")):
        from memplan.integrations.dataset import from_args  # imported only when asked: start-up time

        data, spec = from_args(args, model, spec, None, overheads)  # with --dataset: the dataset's peak step
    est = estimate(model, spec, overheads)
    rows = verdicts(model, spec, args.margin, overheads, est.device_total_bytes)["rows"]
    plan = multi_gpu_plan(model, spec, args.max_gpus, args.margin, overheads, {spec: est}) if args.max_gpus > 1 \
        else []
    if args.json:
        json.dump({"model": model.name, "config": est.config, "device_total_bytes": est.device_total_bytes,
                   "overhead_source": est.overhead_source,
                   "peak_bytes": est.peak_bytes, "units": "bytes", "stack": est.to_dict()["stack"], "gpus": rows,
                   "multi_gpu": plan, **({"dataset": data.to_dict()} if data else {})}, sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from memplan.commands.estimate import describe, stack_line

    # cells are pre-styled Text (no markup parsing), no emoji scan: rendering was most of this command's time
    console = Console(highlight=False, emoji=False)
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
        name = Text.assemble((r["gpu"], "bold"), " ←smallest") if r["gpu"] == first_fit else Text(r["gpu"])
        table.add_row(name, Text(r["kind"]), Text(f"{r['memory_bytes'] / GIB:,.2f}"),
                      Text(f"{r['headroom_bytes'] / GIB:+,.2f}", color), Text(r["verdict"], color),
                      Text(f"{r['max_seq_len']:,}" if r["max_seq_len"] else "—"))
    console.print(table)
    if plan:
        _print_plan(console, plan, args.max_gpus)
    console.print(f"[dim]device overheads: {est.overhead_source}[/]")
    if data is not None:
        from memplan.integrations.dataset import print_plan

        print_plan(data)
    return 0


def _print_plan(console, plan, max_gpus) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title_justify="left", title=f"smallest number of each GPU that fits (1, 2, 4, 8 up to {max_gpus}; "
                  "per-GPU device total; sharding before CPU offload)")
    for c, j in (("GPU", "left"), ("GPUs", "right"), ("strategy", "left"), ("per-GPU total GiB", "right"),
                 ("sent / GPU / step GiB", "right"), ("host RAM GiB", "right")):
        table.add_column(c, justify=j)
    for r in sorted(plan, key=lambda r: (r["gpus"] or 99, r["memory_bytes"])):
        if r["gpus"] is None:
            table.add_row(Text(r["gpu"]), Text(f"> {max_gpus}"), Text("none fits", "red"), *[Text("—")] * 3)
            continue
        strat = {"none": "single GPU"}.get(r["parallel"], r["parallel"])
        if r["offload"] != "none":
            strat += f" + offload {r['offload']}"
        table.add_row(*map(Text, (r["gpu"], str(r["gpus"]), strat, f"{r['device_total_bytes'] / GIB:,.2f}",
                                  f"{r['comm_bytes_per_step'] / GIB:,.2f}" if r["gpus"] > 1 else "—",
                                  f"{r['host_bytes'] / GIB:,.2f}" if r["host_bytes"] else "—")))
    console.print(table)
