"""`memplan fit MODEL --gpu NAME | --budget SIZE [training flags]`: the largest context and batch that fit the
budget less a safety margin, and — when the configuration does not fit — the changes that make it fit, cheapest
first, with what each costs and its source (memplan/plan.py). Imports no torch; answers in milliseconds.
"""
from __future__ import annotations

import json
import sys

from memplan.options import add_train_flags, grid_from_args, model_from_args

GIB = 2**30


def add_budget_flags(p, gpu_required: bool = True) -> None:
    from memplan.plan import DEFAULT_MARGIN

    if gpu_required:
        p.add_argument("--gpu", help="the GPU to fit (see `memplan gpus MODEL`)")
        p.add_argument("--budget", metavar="SIZE", help="a memory budget instead of a GPU: 24GiB, 24GB, 20000MiB")
    p.add_argument("--margin", default=None, metavar="M",
                   help=f"safety margin kept free: a percentage (5%%), a fraction (0.05) or a size (1GiB) "
                        f"(default: {DEFAULT_MARGIN.replace('%', '%%')} of the budget: covers the uncalibrated allocator/context "
                        "figures, the estimate's few-percent error and a display's memory)")


def register(sub) -> None:
    p = sub.add_parser("fit", help="largest context / batch that fits a GPU or budget, and what to change if not",
                       description="Plan a fine-tune against a memory budget, judged on the estimated device total "
                                   "(what nvidia-smi shows). Sizes are GiB (2^30 bytes).")
    p.add_argument("model", help="catalog name or alias, config.json path or folder, or a hub id in the local cache")
    add_budget_flags(p)
    add_train_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def one_spec(args, command: str):
    from memplan.errors import MemplanError

    specs = grid_from_args(args)
    if len(specs) != 1:
        raise MemplanError(f"{command} takes one value per training flag ({len(specs)} configurations given); "
                           "`memplan sweep` takes grids")
    return specs[0]


def run(args) -> int:
    from memplan.calibrate import overheads_for, warn
    from memplan.plan import fit, make_budget

    budget = make_budget(args.gpu, args.budget, args.margin)
    model = model_from_args(args)
    spec = one_spec(args, "fit")
    overheads, notes = overheads_for(args.gpu)  # the GPU's calibration when there is one (docs/calibration.md)
    warn(notes)
    result = fit(model, spec, budget, overheads)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console

    print_fit(Console(highlight=False), result)
    return 0


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


def print_fit(console, r) -> None:
    from rich.table import Table

    from memplan.commands.estimate import describe, stack_line
    from memplan.plan import SEQ_STEP

    b = r.budget
    console.print(f"[bold]{r.model}[/] · {describe(r.config)}")
    console.print(f"[dim]{stack_line(r.config)}[/]")
    console.print(f"{b.label}: {_gib(b.total_bytes)} GiB − margin {_gib(b.margin_bytes)} = "
                  f"[bold]{_gib(b.usable_bytes)} GiB usable[/] (GiB = 2^30 bytes; judged on the device total)")
    room = b.usable_bytes - r.device_total_bytes
    verdict = "[green]fits[/]" if r.fits else "[red]does not fit[/]"
    console.print(f"this configuration: device total {_gib(r.device_total_bytes)} GiB (tensor peak "
                  f"{_gib(r.peak_bytes)}) → {verdict}, {'headroom' if room >= 0 else 'short by'} "
                  f"{_gib(abs(room))} GiB")
    bs, seq = r.config["batch_size"], r.config["seq_len"]
    if r.max_seq_len:
        more = "+ (search cap)" if r.max_seq_len_capped else ""
        pos = r.model_max_positions
        warn = (f" [yellow](beyond the model's {pos:,} positions)[/]"
                if pos and r.max_seq_len > pos else "")
        console.print(f"largest sequence length at batch {bs}: [bold]{r.max_seq_len:,}{more}[/] tokens "
                      f"(multiples of {SEQ_STEP}){warn}")
    else:
        console.print(f"largest sequence length at batch {bs}: [red]none[/] (not even {SEQ_STEP} tokens)")
    if r.max_batch_size:
        console.print(f"largest batch at sequence length {seq:,}: [bold]{r.max_batch_size}"
                      f"{'+ (search cap)' if r.max_batch_capped else ''}[/]")
    else:
        console.print(f"largest batch at sequence length {seq:,}: [red]none[/] (batch 1 does not fit)")
    if len(r.frontier) > 1:
        console.print("largest sequence length by batch: " + " · ".join(
            f"{f['batch_size']}×{f['max_seq_len']:,}" for f in r.frontier))
    if r.options:
        table = Table(title="changes that make it fit, cheapest first (each alone)", title_justify="left")
        for c in ("#", "change", "device GiB", "fits", "what it costs", "source"):
            table.add_column(c, justify="right" if c in ("#", "device GiB") else "left",
                             overflow="fold", style="dim" if c == "source" else None)
        for i, o in enumerate(r.options, 1):
            table.add_row(str(i), o.label, _gib(o.device_total_bytes), "[green]yes[/]" if o.fits else "[red]no[/]",
                          o.cost, o.source)
        console.print(table)
    if r.combination:
        console.print("[bold]no single change is enough; combined, cheapest first:[/]")
        for st in r.combination:
            console.print(f"  + {st.label}: device total {_gib(st.device_total_bytes)} GiB"
                          f"{' [green]fits[/]' if st.fits else ''}")
    console.print(f"[dim]device overheads: {r.overhead_source}[/]")
    console.print(f"[dim]searched {r.configurations_searched:,} configurations ({r.estimates} estimated, the rest "
                  f"decided by monotonicity) in {r.seconds * 1000:.0f} ms[/]")
