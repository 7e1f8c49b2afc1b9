"""`memplan estimate MODEL [training flags]`: the analytic memory estimate, as a table, CSV or JSON.

One configuration prints its component table, phases, device overheads and a fits / does-not-fit verdict per
GPU; comma-separated flag values make a grid, printed one row per configuration. Imports no torch.
"""
from __future__ import annotations

import json
import sys

from memplan.options import add_train_flags, grid_from_args, model_from_args, varying_fields

GIB = 2**30


def register(sub) -> None:
    p = sub.add_parser("estimate", help="analytic memory estimate (no torch; milliseconds)",
                       description="Estimate the GPU memory of one fine-tuning step from the architecture alone. "
                                   "Sizes are GiB (2^30 bytes).")
    p.add_argument("model", nargs="?", help="catalog name or alias, config.json path or folder, or a hub id in the "
                   "local cache (optional with --from FILE: the model the config names)")
    add_train_flags(p)
    p.add_argument("--gpu", help="judge fit against this GPU only (see `memplan gpus`); also picks that GPU's "
                   "calibration")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--calibration", metavar="NAME|PATH", help="use this calibration file (default: the newest "
                   "calibration of --gpu, else the newest one; docs/calibration.md)")
    c.add_argument("--no-calibration", action="store_true", help="use the uncalibrated default overheads")
    p.add_argument("--json", action="store_true", help="print JSON (a list for a grid)")
    p.add_argument("--csv", metavar="PATH", help="write one row per configuration (columns: docs/csv.md)")
    from memplan.integrations.dataset import add_flags

    add_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from memplan.calibrate import overheads_for, warn
    from memplan.catalog import resolve_gpu
    from memplan.estimate import estimate

    if args.csv:
        from memplan.outputs import output_path

        output_path(args.csv, "--csv")
    model = model_from_args(args)
    specs = grid_from_args(args)
    gpu = resolve_gpu(args.gpu) if args.gpu else None
    overheads, cal_notes = overheads_for(gpu.name if gpu else None, args.calibration, args.no_calibration)
    data = None
    if getattr(args, "dataset", None) or getattr(args, "tokenizer", None):
        from memplan.errors import MemplanError
        from memplan.integrations.dataset import from_args

        if len(specs) != 1:
            raise MemplanError(f"--dataset plans one configuration ({len(specs)} given); `memplan sweep` takes grids")
        data, peak = from_args(args, model, specs[0], gpu.memory_bytes if gpu else None, overheads)
        specs = [peak]
    results = [estimate(model, spec, overheads) for spec in specs]
    if args.json or len(results) > 1:  # a single table prints the notes itself
        warn(cal_notes)
    for r in results:
        r.notes.extend(n for n in cal_notes if n.startswith("ignoring"))
    if args.csv:
        from memplan.report.rows import row, write_csv

        write_csv(args.csv, [row(r) for r in results])
    if args.json:
        payload = [r.to_dict() for r in results]
        if data is not None:
            payload[0]["dataset"] = data.to_dict()
        mapping = getattr(args, "_from_mapping", None)
        if mapping is not None:
            for d in payload:
                d["from"] = mapping.to_dict()  # the --from mapping, also printed to stderr
        json.dump(payload[0] if len(payload) == 1 else payload, sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console

    console = Console()
    if len(results) == 1:
        print_one(console, model, results[0], gpu)
        if data is not None:
            from memplan.integrations.dataset import print_plan

            print_plan(data)
    else:
        print_grid(console, model, results, specs, gpu)
    console.print(f"[dim]device overheads: {_which(overheads, cal_notes, results[0].overhead_source)}[/]",
                  highlight=False)
    if args.csv:
        console.print(f"[dim]wrote {len(results)} row(s) to {args.csv}[/]")
    return 0


def _which(overheads, notes, used: str = "") -> str:
    """Which calibration this estimate used, in words (`used`: the estimate's overhead_source)."""
    if overheads.calibration:
        return overheads.source
    why = [n for n in notes if not n.startswith("ignoring")]
    if used and "replay" in used:
        return "; ".join([*why[:1], used])
    return why[0] if why else "uncalibrated defaults (overhead.json)"


def describe(cfg: dict) -> str:
    if cfg["method"] == "full":
        head = f"full fine-tuning {cfg['bits']}-bit"
    elif cfg["bits"] == 4:
        head = f"QLoRA {cfg['quant_type']}{'+dq' if cfg['double_quant'] else ''} {cfg['compute_dtype']}"
    elif cfg["bits"] == 8:
        head = f"LoRA on LLM.int8 {cfg['compute_dtype']}"
    else:
        head = f"LoRA on {cfg['bits']}-bit"
    if cfg.get("gpus", 1) > 1 or cfg.get("parallel", "auto") not in ("auto", "none"):
        head = f"{cfg['gpus']}× GPU {cfg['parallel']} · " + head
    if cfg["method"] == "lora":
        targets = cfg["lora_targets"] if isinstance(cfg["lora_targets"], str) else "+".join(cfg["lora_targets"])
        head += f" · r={cfg['lora_r']} {targets}{' DoRA' if cfg['dora'] else ''}"
        if cfg["bits"] in (4, 8):
            head += f" · upcast {'on' if cfg['upcast'] else 'off'}"
    extra = "".join(f" · {label}" for label in (
        f"offload {cfg.get('activation_offload')}" if cfg.get("activation_offload", "off") != "off" else "",
        f"loss {cfg.get('loss')}" if cfg.get("loss", "standard") != "standard" else "",
        "liger kernels" if cfg.get("liger") else "") if label)
    return (f"{head} · {cfg['optimizer']} · batch {cfg['batch_size']} × seq {cfg['seq_len']} · "
            f"checkpointing {'on' if cfg['gradient_checkpointing'] else 'off'} · {cfg['attention']}{extra}")


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


def gpu_verdicts(device_total: int, gpu=None) -> list[tuple[object, int]]:
    """(gpu, headroom bytes) for the chosen GPU or every catalog GPU, smallest memory first."""
    from memplan.catalog import gpu_list

    return [(g, g.memory_bytes - device_total) for g in ([gpu] if gpu else gpu_list())]


def print_one(console, model, est, gpu) -> None:
    from rich.table import Table

    from memplan.estimate import SOURCES

    console.print(f"[bold]{model.name}[/] · {est.params_total / 1e9:.2f} B params, "
                  f"{est.params_trainable / 1e6:,.1f} M trainable")
    console.print(f"[dim]{describe(est.config)}[/]")
    if est.parallel:
        p = est.parallel
        console.print(f"[bold]per GPU[/], rank 0 of {p['gpus']} · {p['strategy']}"
                      f"{' (FSDP' + str(p['fsdp_version']) + ')' if p['strategy'].startswith('fsdp') else ''}"
                      f"{' · offload ' + p['offload'] if p['offload'] != 'none' else ''} · 4-bit storage "
                      f"{p['quant_storage']} · rank 0 holds the most · sends "
                      f"{p['comm_bytes_per_step'] / GIB:,.2f} GiB per step"
                      + (f" · host RAM {est.host_bytes / GIB:,.2f} GiB per node" if est.host_bytes else ""))
    console.print(f"[dim]{stack_line(est.config)}[/]", highlight=False)
    table = Table(title=f"memory at the peak ({est.peak_phase} phase) · GiB = 2^30 bytes", title_justify="left")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("share", justify="right")
    table.add_column("source", style="dim", overflow="fold")
    for name, value in est.components.items():
        if value:
            table.add_row(name, _gib(value), f"{value / est.peak_bytes:.1%}", SOURCES[name])
    table.add_section()
    table.add_row("[bold]tensor peak[/]", f"[bold]{_gib(est.peak_bytes)}[/]", "",
                  "compare with torch.cuda.max_memory_allocated")
    for i, (name, value) in enumerate(est.device_overheads.items()):
        table.add_row(name, _gib(value), "", "see 'device overheads' below" if i == 0 else "")
    table.add_row("[bold]device total[/]", f"[bold]{_gib(est.device_total_bytes)}[/]", "",
                  "compare with nvidia-smi / NVML used memory")
    console.print(table)
    console.print("phases (tensor peak, GiB): " + " · ".join(
        f"{'[bold]' if p == est.peak_phase else ''}{p} {_gib(v)}{'[/]' if p == est.peak_phase else ''}"
        for p, v in est.phases.items()))
    verdicts = gpu_verdicts(est.device_total_bytes, gpu)
    fits = [f"{g.name} (+{_gib(room)})" for g, room in verdicts if room >= 0]
    short = [f"{g.name} ({_gib(room)})" for g, room in verdicts if room < 0]
    if gpu:
        g, room = verdicts[0]
        verdict = "[green]fits[/]" if room >= 0 else "[red]does not fit[/]"
        console.print(f"{g.name} ({_gib(g.memory_bytes)} GiB): {verdict}, headroom {_gib(room)} GiB")
    else:
        console.print(f"[green]fits[/] {len(fits)} catalog GPUs, smallest (headroom GiB): "
                      f"{', '.join(fits[:4]) or 'none'}")
        if short:
            console.print(f"[red]does not fit[/] {len(short)}, largest (shortfall GiB): {', '.join(short[::-1][:4])}"
                          " · `memplan gpus` lists all")
    h = est.host
    if h:
        ranks = h.get("gpus_per_node", 1)
        each = f", each of {ranks} ranks" if ranks > 1 else ""
        parts = [f"loading {_gib(h['load_transient_bytes'])} (one tensor at a time from mmapped safetensors{each})"]
        if h.get("offloaded_state_bytes"):
            parts.append(f"offloaded {est.parallel.get('offload')} state {_gib(h['offloaded_state_bytes'])}")
        if h["offloaded_activations_bytes"]:
            parts.append(f"offloaded activations {_gib(h['offloaded_activations_bytes'])} pinned")
        if h["paged_optimizer_bytes"]:
            parts.append(f"paged optimizer states {_gib(h['paged_optimizer_bytes'])} once evicted")
        node = " per node" if ranks > 1 else ""
        console.print(f"host RAM (GiB){node}: peak {_gib(h['peak_bytes'])} · " + " · ".join(parts)
                      + " [dim](estimate/host.py; the runtime's own RAM not counted)[/]")
        moved = h["pcie_to_host_bytes_per_step"] + h["pcie_to_device_bytes_per_step"]
        if moved:
            link = f" ≥ {moved / (gpu.host_link_gbs * 1e9):.2f} s at {gpu.host_link}" if gpu and gpu.host_link_gbs \
                else ""
            console.print(f"host link per step: {_gib(h['pcie_to_host_bytes_per_step'])} GiB to host, "
                          f"{_gib(h['pcie_to_device_bytes_per_step'])} GiB back{link}")
    if est.paging:
        console.print(f"paged optimizer: the step stays alive down to a device total of "
                      f"{_gib(est.paging['floor_device_total_bytes'])} GiB (tensor floor "
                      f"{_gib(est.paging['floor_bytes'])}) with the {_gib(est.paging['evictable_bytes'])} GiB of states "
                      f"evicted, moving {_gib(est.paging['pcie_bytes_per_step_at_floor'])} GiB per step over the host link")
    for note in est.notes:
        console.print(f"[yellow]note:[/] {note}")


def print_grid(console, model, results, specs, gpu) -> None:
    from rich.table import Table

    cols = varying_fields(specs)
    table = Table(title=f"{model.name}: {len(results)} configurations · GiB = 2^30 bytes", title_justify="left")
    for c in cols:
        table.add_column(c.replace("_", " "))
    for c in ("trainable M", "peak phase", "tensor peak GiB", "device total GiB"):
        table.add_column(c, justify="right")
    if gpu:
        table.add_column(f"fits {gpu.name}")
    for spec, est in zip(specs, results):
        cfg = est.config
        cells = [_cell(cfg[c]) for c in cols]
        cells += [f"{est.params_trainable / 1e6:,.1f}", est.peak_phase, _gib(est.peak_bytes),
                  _gib(est.device_total_bytes)]
        if gpu:
            cells.append("[green]yes[/]" if est.device_total_bytes <= gpu.memory_bytes else "[red]no[/]")
        table.add_row(*cells)
    console.print(table)
    for line in dict.fromkeys(stack_line(est.config) for est in results):
        console.print(f"[dim]{line}[/]", highlight=False)


def stack_line(cfg: dict) -> str:
    """'stack: transformers 5.24.0 · peft 0.21.2 · ...': the library versions a result describes."""
    from memplan.stack import describe as describe_stack
    from memplan.stack import stack

    return "stack: " + describe_stack(stack(cfg.get("transformers", 0)))


def _cell(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, list):
        return "+".join(v)
    return str(v)
