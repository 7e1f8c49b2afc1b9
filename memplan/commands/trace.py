"""`memplan trace MODEL [training flags]`: run one real training step on meta tensors and count every byte.

The same flags as `memplan estimate`; `--json` prints the same keys as `estimate --json` (plus trace-only keys),
so the two compare field by field. Heavy imports (torch, transformers, peft, bitsandbytes) happen in run().
"""
from __future__ import annotations

import json
import sys

from memplan.options import add_train_flags, grid_from_args, model_from_args


def register(sub) -> None:
    p = sub.add_parser("trace", help="exact tensor bytes of one real training step, traced on meta tensors",
                       description="Run one real QLoRA/LoRA training step (transformers + PEFT + bitsandbytes) "
                                   "on meta tensors on the CPU and count every live tensor byte. "
                                   "Sizes are GiB (2^30 bytes). See docs/trace.md for what a trace cannot see.")
    p.add_argument("model", help="catalog name or alias, config.json path or folder, or a hub id in the local cache")
    add_train_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON (a list for a grid)")
    p.add_argument("--timeline", metavar="PATH.csv", help="write live bytes through the step as CSV")
    p.add_argument("--plot", metavar="PATH.png", help="draw the timeline with the phases marked (matplotlib)")
    p.add_argument("--real", action="store_true",
                   help="run on real CPU tensors instead of meta (small models only: it allocates every byte)")
    p.set_defaults(func=run)


def _suffixed(path: str, index: int, count: int) -> str:
    if count == 1:
        return path
    stem, dot, ext = path.rpartition(".")
    return f"{stem}-{index + 1}.{ext}" if dot else f"{path}-{index + 1}"


def run(args) -> int:
    import logging

    from memplan.errors import MemplanError

    model = model_from_args(args)
    specs = grid_from_args(args)
    if args.real and model.total_params > 2_000_000_000:
        raise MemplanError(f"--real allocates every byte on the CPU: {model.name} is too large "
                           f"({model.total_params / 1e9:.1f} B params); drop --real")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.disable(logging.WARNING)
    from memplan.trace import run_trace
    from memplan.trace.report import plot_timeline, print_result, write_timeline_csv

    payload = []
    for i, spec in enumerate(specs):
        if spec.strategy != "none":  # rank 0 of a data-parallel job, on a fake process group
            from memplan.trace.distributed import run_rank_trace

            result = run_rank_trace(model, spec, real=args.real, keep_timeline=bool(args.timeline or args.plot))
        else:
            result = run_trace(model, spec, real=args.real)
        csv_path = write_timeline_csv(result, _suffixed(args.timeline, i, len(specs))) if args.timeline else None
        if args.plot:
            plot_timeline(result, _suffixed(args.plot, i, len(specs)))
        if args.json:
            payload.append(result.to_dict(timeline_csv=csv_path))
        else:
            print_result(result)
    if args.json:
        json.dump(payload[0] if len(payload) == 1 else payload, sys.stdout, indent=2)
        print()
    return 0
