"""`memplan sweep MODEL... [grid flags] --out reports/NAME.csv [--plot reports/NAME.png]`: estimate every model ×
configuration of the grid, write one CSV row each (columns: memplan/report/rows.py, docs/csv.md) and optionally
a figure (memplan/report/plots.py): peak vs sequence length per bit width with GPU capacities, or a stacked bar
of components per configuration. Imports no torch; matplotlib only when plotting."""
from __future__ import annotations

from memplan.options import add_train_flags, grid_from_args, model_from_args

DEFAULT_GPUS = "rtx-4090,rtx-a6000,a100-80gb,h200"


def register(sub) -> None:
    p = sub.add_parser("sweep", help="estimate a grid of models × settings into a CSV (and a figure) for papers",
                       description="Estimate every model × configuration of a grid (comma-separated flag values) "
                                   "and write one CSV row each; optionally plot. Sizes are GiB (2^30 bytes).")
    p.add_argument("models", nargs="*", metavar="MODEL", help="catalog names, config.json paths or cached hub ids")
    add_train_flags(p)
    p.add_argument("--out", required=True, metavar="PATH.csv", help="CSV to write (columns: docs/csv.md)")
    p.add_argument("--plot", metavar="PATH.png", help="also draw a figure (needs matplotlib)")
    p.add_argument("--kind", choices=("auto", "lines", "bars"), default="auto",
                   help="lines: device total vs sequence length per bit width, GPU capacities as horizontal lines; "
                        "bars: stacked components per configuration; auto: lines when seq-len takes 3+ values")
    p.add_argument("--plot-gpus", default=DEFAULT_GPUS, metavar="G,G",
                   help=f"GPU capacities drawn on the lines plot (default: {DEFAULT_GPUS}; 'none' for none). "
                        "--gpus is the training flag: GPUs (ranks) per run; rows are then per rank")
    p.add_argument("--title", help="figure title")
    p.set_defaults(func=run)


def sweep(args, specs) -> list:
    """(model, spec, estimate) for every model × spec, in that order."""
    from memplan.calibrate import overheads_for, warn
    from memplan.estimate import estimate

    overheads, notes = overheads_for()  # the newest calibration, named in each row's `calibration` column
    warn(notes)
    out = []
    for ref in args.models or [None]:  # none given: the model --from FILE names
        model = model_from_args(args, ref)
        out.extend((model, spec, estimate(model, spec, overheads)) for spec in specs)
    return out


def run(args) -> int:
    from memplan.catalog import resolve_gpu
    from memplan.outputs import output_path
    from memplan.report.rows import row, write_csv

    output_path(args.out, "--out")
    if args.plot:
        output_path(args.plot, "--plot")
    specs = grid_from_args(args)
    gpus = ([] if args.plot_gpus.strip().lower() == "none" else
            [resolve_gpu(g) for g in args.plot_gpus.split(",") if g.strip()])
    results = sweep(args, specs)
    rows = [row(est) for _, _, est in results]
    write_csv(args.out, rows)
    print(f"wrote {len(rows)} row(s) to {args.out}")
    if args.plot:
        from memplan.report import plots

        kind = args.kind
        if kind == "auto":
            kind = "lines" if len({r["seq_len"] for r in rows}) >= 3 else "bars"
        if kind == "lines":
            plots.peak_vs_seq(rows, args.plot, gpus=gpus, title=args.title)
        else:
            plots.stacked_components(rows, args.plot, title=args.title)
        print(f"wrote {kind} figure to {args.plot}")
    return 0
