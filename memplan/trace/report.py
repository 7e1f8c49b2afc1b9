"""Trace output: rich tables, the timeline CSV and the timeline figure. Sizes are GiB (2^30 bytes)."""
from __future__ import annotations

import csv
from pathlib import Path

from memplan.errors import MemplanError

GIB = 2**30
PHASE_COLORS = {"load": "#dddddd", "forward": "#cfe3f7", "backward": "#f7dccf", "optimizer": "#d8f0d2"}


def downsample(timeline: list, max_points: int = 20000) -> list:
    """At most ~max_points rows; each bucket keeps its highest point (peaks survive) and its last one."""
    if len(timeline) <= max_points:
        return list(timeline)
    step = -(-len(timeline) // (max_points // 2))
    out = []
    for i in range(0, len(timeline), step):
        bucket = timeline[i:i + step]
        top = max(bucket, key=lambda row: row[1])
        last = bucket[-1]
        out.append(top)
        if last is not top:
            out.append(last)
    return out


def write_timeline_csv(result, path: str) -> str:
    rows = downsample(result.timeline)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["event", "live_bytes", "live_gib", "phase", "step"])
            step, prev = 1, None
            for event, live, phase in rows:
                if prev == "optimizer" and phase == "forward":
                    step += 1
                prev = phase
                w.writerow([event, live, f"{live / GIB:.6f}", phase, step])
    except OSError as e:
        raise MemplanError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def plot_timeline(result, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = downsample(result.timeline, 8000)
    if not rows:
        raise MemplanError("the trace recorded no timeline")
    xs = [r[0] for r in rows]
    ys = [r[1] / GIB for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    # phase spans
    start, phase = xs[0], rows[0][2]
    seen = set()
    for (x, _, p) in rows[1:] + [(xs[-1] + 1, 0, None)]:
        if p != phase:
            ax.axvspan(start, x, color=PHASE_COLORS.get(phase, "#eeeeee"), alpha=0.7, lw=0,
                       label=None if phase in seen else phase)
            seen.add(phase)
            start, phase = x, p
    ax.step(xs, ys, where="post", color="#1f4e79", lw=1.2)
    peak = result.peak_bytes / GIB
    px = max(rows, key=lambda r: r[1])[0]
    ax.axhline(peak, color="#b22222", lw=0.8, ls="--")
    ax.annotate(f"peak {peak:.2f} GiB ({result.peak_phase})", (px, peak), textcoords="offset points",
                xytext=(5, 5), color="#b22222", fontsize=9)
    cfg = result.config
    ax.set_title(f"{result.model}: live tensor bytes through {result.steps} training steps "
                 f"(bits {cfg['bits']}, seq {cfg['seq_len']}, batch {cfg['batch_size']}, "
                 f"ckpt {'on' if cfg['gradient_checkpointing'] else 'off'}, {cfg['attention']})", fontsize=9)
    ax.set_xlabel("allocation / release event")
    ax.set_ylabel("live tensor GiB (2^30 bytes)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise MemplanError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path


def print_result(result, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg = result.config
    title = (f"{result.model} — traced on {'real CPU tensors' if result.real else 'meta tensors'} "
             f"({result.wall_s:.1f} s): peak {result.peak_bytes / GIB:.3f} GiB in {result.peak_phase}")
    console.print(f"[dim]{result.stack_line}[/]", highlight=False)
    t = Table(title=title, title_justify="left")
    t.add_column("component at the peak")
    t.add_column("GiB", justify="right")
    t.add_column("share", justify="right")
    for name, value in result.components.items():
        share = value / result.peak_bytes if result.peak_bytes else 0.0
        t.add_row(name, f"{value / GIB:.3f}", f"{share:.1%}")
    t.add_row("[bold]peak (tensor bytes)", f"[bold]{result.peak_bytes / GIB:.3f}", "100.0%")
    console.print(t)
    p = Table(title="peak live bytes by phase (max over both steps)", title_justify="left")
    p.add_column("phase")
    p.add_column("GiB", justify="right")
    for name, value in result.phases.items():
        p.add_row(name + (" ◀ peak" if name == result.peak_phase else ""), f"{value / GIB:.3f}")
    console.print(p)
    top = Table(title="largest live tensors at the peak", title_justify="left")
    for col, just in (("GiB", "right"), ("category", "left"), ("shape", "left"), ("dtype", "left"),
                      ("made by (module)", "left"), ("phase", "left")):
        top.add_column(col, justify=just)
    for r in result.top_tensors[:10]:
        top.add_row(f"{r['bytes'] / GIB:.3f}", r["category"], "×".join(map(str, r["shape"])) or "scalar",
                    r["dtype"], r["module"] or "-", r["phase"])
    console.print(top)
    console.print(f"params: {result.params_total:,} total, {result.params_trainable:,} trainable. "
                  f"bits {cfg['bits']}, seq {cfg['seq_len']}, batch {cfg['batch_size']}, "
                  f"checkpointing {'on' if cfg['gradient_checkpointing'] else 'off'}, attention {cfg['attention']}, "
                  f"optimizer {cfg['optimizer']}.")
    for note in result.notes:
        console.print(f"note: {note}")
    console.print("Tensor bytes only: the CUDA context, cuBLAS workspace and allocator rounding are not seen by a "
                  "meta trace (docs/trace.md); --allocator replays the caching allocator (docs/allocator.md).",
                  style="dim")
