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
    p.add_argument("model", nargs="?", help="catalog name or alias, config.json path or folder, or a hub id in the "
                   "local cache (optional with --from FILE: the model the config names)")
    add_train_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON (a list for a grid)")
    p.add_argument("--timeline", metavar="PATH.csv", help="write live bytes through the step as CSV")
    p.add_argument("--plot", metavar="PATH.png", help="draw the timeline with the phases marked (matplotlib)")
    p.add_argument("--real", action="store_true",
                   help="run on real CPU tensors instead of meta (small models only: it allocates every byte)")
    a = p.add_argument_group("caching allocator replay (memplan/allocator)")
    a.add_argument("--allocator", action="store_true",
                   help="replay the step's allocations through a model of PyTorch's CUDA caching allocator: "
                        "predicted max_memory_reserved, fragmentation, and where a --gpu/--budget would run out")
    a.add_argument("--alloc-conf", metavar="STR", default=None,
                   help="a PYTORCH_CUDA_ALLOC_CONF string, e.g. expandable_segments:True (default: the "
                        "PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF environment variable, else torch's defaults)")
    a.add_argument("--gpu", help="replay on this catalog GPU's memory (with --allocator)")
    a.add_argument("--budget", metavar="SIZE", help="replay on this much GPU memory, e.g. 24GiB (with --allocator)")
    a.add_argument("--alloc-csv", metavar="PATH.csv", help="write requested / allocated / reserved bytes through "
                                                           "the replay as CSV (with --allocator)")
    p.set_defaults(func=run)


def alloc_conf_from(args):
    """--alloc-conf, else the environment variable torch reads (PYTORCH_ALLOC_CONF first since torch 2.9)."""
    import os

    from memplan.allocator import parse_alloc_conf

    text = args.alloc_conf
    if text is None:
        text = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    return parse_alloc_conf(text)


def gpu_bytes_from(args) -> int | None:
    from memplan.errors import MemplanError

    if args.gpu and args.budget:
        raise MemplanError("give one of --gpu NAME or --budget SIZE")
    if args.gpu:
        from memplan.catalog import resolve_gpu

        return resolve_gpu(args.gpu).memory_bytes
    if args.budget:
        from memplan.plan import parse_size

        return parse_size(args.budget)
    return None


def _suffixed(path: str, index: int, count: int) -> str:
    if count == 1:
        return path
    stem, dot, ext = path.rpartition(".")
    return f"{stem}-{index + 1}.{ext}" if dot else f"{path}-{index + 1}"


def run(args) -> int:
    import logging

    from memplan.errors import MemplanError

    from memplan.outputs import output_path

    model = model_from_args(args)
    specs = grid_from_args(args)
    if not args.allocator and (args.alloc_conf is not None or args.gpu or args.budget or args.alloc_csv):
        raise MemplanError("--alloc-conf, --gpu, --budget and --alloc-csv go with --allocator")
    conf = alloc_conf_from(args) if args.allocator else None
    gpu_bytes = gpu_bytes_from(args) if args.allocator else None
    if conf is not None and conf.per_process_memory_fraction is not None and gpu_bytes is None:
        raise MemplanError("per_process_memory_fraction is a fraction of the GPU's memory: give --gpu or --budget")
    for i in range(len(specs)):  # every file this grid will write, checked before minutes of tracing
        for option, path in (("--timeline", args.timeline), ("--plot", args.plot),
                             ("--alloc-csv", args.alloc_csv)):
            if path:
                output_path(_suffixed(path, i, len(specs)), option)
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
            result = run_trace(model, spec, real=args.real, record_allocations=args.allocator)
        csv_path = write_timeline_csv(result, _suffixed(args.timeline, i, len(specs))) if args.timeline else None
        if args.plot:
            plot_timeline(result, _suffixed(args.plot, i, len(specs)))
        dev = None
        if args.allocator:
            from memplan.allocator.device import device_replay
            from memplan.allocator.report import write_csv

            dev = device_replay(result.allocations, conf, gpu_bytes=gpu_bytes)
            if args.alloc_csv:
                write_csv(dev.replay, _suffixed(args.alloc_csv, i, len(specs)))
        if args.json:
            d = result.to_dict(timeline_csv=csv_path)
            if dev is not None:
                d["allocator"] = dev.to_dict()
                d["device_total_bytes"] = dev.device_total_bytes
            payload.append(d)
        else:
            print_result(result)
            if dev is not None:
                from memplan.allocator.report import summary_lines

                print("\n".join(summary_lines(dev.replay, dev)))
    if args.json:
        json.dump(payload[0] if len(payload) == 1 else payload, sys.stdout, indent=2)
        print()
    return 0
