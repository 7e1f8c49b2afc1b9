"""Figures for papers, drawn from CSV rows (memplan/report/rows.py): matplotlib with the Agg backend, imported only
inside the functions, so nothing else in memplan pays for it.

  peak_vs_seq        device total (GiB) vs sequence length, one panel per model, one line per bit width (and per
                     other varying setting), GPU capacities as dashed horizontal lines
  stacked_components one horizontal bar per configuration, stacked by component (tensor bytes at the peak) plus
                     the device overheads (CUDA context, cuBLAS workspace, allocator), in GiB
  predicted_vs_measured  predicted vs measured bytes, one point per profiled configuration and predictor
                     (estimate, trace, device total), log-log, with y = x and the +-5% band
                     (rows: memplan validate --against profiles, memplan/commands/validate.py)
"""
from __future__ import annotations

from memplan.spec import TRAIN_FIELDS

GIB = 2**30
COMPONENT_LABELS = {
    "weights_quantized": "quantized weights", "quant_state": "quantization state",
    "weights_unquantized": "unquantized weights", "lora": "LoRA adapters", "gradients": "gradients",
    "optimizer_states": "optimizer states", "activations": "activations", "logits_loss": "logits + loss",
    "temporaries": "temporaries", "comm_buffers": "communication buffers",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _varying(rows: list[dict], exclude: tuple[str, ...] = ()) -> list[str]:
    return [f for f in ("model", *TRAIN_FIELDS) if f not in exclude and len({str(r[f]) for r in rows}) > 1]


def _fmt(field: str, value) -> str:
    if field == "bits":
        return f"{value}-bit"
    if field == "gradient_checkpointing":
        return "ckpt on" if value is True or value == "True" else "ckpt off"
    if field in ("model", "optimizer", "attention", "lora_targets"):
        return str(value)
    if isinstance(value, bool) or value in ("True", "False"):
        return f"{field.replace('_', ' ')} {'on' if value in (True, 'True') else 'off'}"
    if field == "batch_size":
        return f"batch {value}"
    if field == "seq_len":
        return f"seq {value}"
    return f"{field.replace('_', ' ')} {value}"


def _save(fig, path: str) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"Software": None})


def peak_vs_seq(rows: list[dict], path: str, gpus=(), title: str | None = None) -> None:
    """One panel per model; x: sequence length (log 2), y: device total GiB; a line per series."""
    plt = _pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    series_fields = _varying(rows, exclude=("model", "seq_len"))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    keys = list(dict.fromkeys(tuple(str(r[f]) for f in series_fields) for r in rows))
    colors = plt.get_cmap("tab10")
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        top = 0.0
        for i, key in enumerate(keys):
            pts = sorted((int(r["seq_len"]), r["device_total_bytes"] / GIB) for r in mine
                         if tuple(str(r[f]) for f in series_fields) == key)
            if not pts:
                continue
            label = ", ".join(_fmt(f, v) for f, v in zip(series_fields, key)) or "device total"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, color=colors(i % 10), label=label)
            top = max(top, max(p[1] for p in pts))
        ymax = top * 1.12
        for g in gpus:
            cap = g.memory_bytes / GIB
            if cap <= ymax * 1.6:  # draw capacities in or just above the data's range
                ax.axhline(cap, color="0.45", ls="--", lw=0.9)
                ax.annotate(f"{g.name} {cap:.0f} GiB", xy=(0.01, cap), xycoords=("axes fraction", "data"),
                            va="bottom", ha="left", fontsize=7.5, color="0.3")
                ymax = max(ymax, cap * 1.08)
        ax.set_xscale("log", base=2)
        seqs = sorted({int(r["seq_len"]) for r in mine})
        ax.set_xticks(seqs)
        ax.set_xticklabels([f"{s // 1024}k" if s >= 1024 else str(s) for s in seqs], fontsize=8)
        ax.set_ylim(0, ymax)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("estimated device total (GiB = 2^30 B)")
        ax.set_title(model, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    fixed = _fixed_text(rows, exclude=("model", "seq_len", *series_fields))
    fig.suptitle(title or "memplan: peak device memory vs sequence length", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, 0.93),
               ncols=min(len(seen), 6), fontsize=8.5, frameon=False)
    fig.text(0.5, -0.01, fixed, ha="center", va="top", fontsize=7.5, color="0.35", wrap=True)
    _save(fig, path)
    plt.close(fig)


def _fixed_text(rows: list[dict], exclude=()) -> str:
    r0 = rows[0]
    keep = ("bits", "method", "lora_r", "lora_targets", "optimizer", "batch_size", "gradient_checkpointing",
            "attention", "upcast", "compute_dtype")
    quantized = all(str(r["bits"]) in ("4", "8") for r in rows)  # the fp32 upcast means nothing at 16/32 bits
    parts = [_fmt(f, r0[f]) for f in keep if f not in exclude and len({str(r[f]) for r in rows}) == 1
             and (f != "upcast" or quantized)]
    return (f"memplan {r0['memplan_version']} · " + " · ".join(parts) + f" · overheads: {r0['calibration']}")


def stacked_components(rows: list[dict], path: str, title: str | None = None) -> None:
    """One horizontal bar per row, stacked by component, plus the device overheads."""
    from memplan.estimate import COMPONENTS

    plt = _pyplot()
    label_fields = _varying(rows) or ["model"]
    labels = [" · ".join(_fmt(f, r[f]) for f in label_fields) for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    cmap = plt.get_cmap("tab10")
    palette = [cmap(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # tab10 without its gray (the overheads are gray)
    left = [0.0] * len(rows)
    parts = [(c, COMPONENT_LABELS[c], [int(r.get(f"{c}_bytes") or 0) / GIB for r in rows]) for c in COMPONENTS]
    parts.append(("device", "device overheads", [(r["device_total_bytes"] - r["peak_bytes"]) / GIB for r in rows]))
    ys = list(range(len(rows)))[::-1]
    for i, (key, name, vals) in enumerate(parts):
        if not any(vals):
            continue
        color = "0.75" if key == "device" else palette[i % len(palette)]
        ax.barh(ys, vals, left=left, color=color, label=name, height=0.7,
                hatch="//" if key == "device" else None, edgecolor="white", lw=0.4)
        left = [a + b for a, b in zip(left, vals)]
    for y, total, r in zip(ys, left, rows):
        ax.text(total, y, f" {total:.1f}", va="center", fontsize=7.5)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("estimated device memory (GiB = 2^30 B): tensor peak by component + device overheads")
    ax.set_xlim(0, max(left) * 1.1)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title or "memplan: memory at the peak, by component", fontsize=11)
    fig.text(0.5, -0.01, _fixed_text(rows, exclude=tuple(label_fields)), ha="center", va="top", fontsize=7.5,
             color="0.35")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def predicted_vs_measured(rows: list[dict], path: str, title: str | None = None, band: float = 0.05) -> None:
    """x: measured, y: predicted (GiB, log-log); one point per configuration and predictor: the estimate's tensor
    peak and the trace's peak against the measured tensor peak (CUDA max_memory_allocated, CPU tracker), the
    estimate's device total against the NVML process peak (CUDA only). The shaded band is y = x within +-band."""
    plt = _pyplot()
    series = [("estimate tensor peak", "measured_tensor_peak_bytes", "estimate_tensor_peak_bytes", "o", "tab:blue"),
              ("trace peak", "measured_tensor_peak_bytes", "trace_peak_bytes", "x", "tab:orange"),
              ("estimate device total vs NVML", "measured_nvml_process_peak_bytes", "estimate_device_total_bytes",
               "s", "tab:green")]
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    lo, hi = None, None
    for label, mkey, pkey, marker, color in series:
        pts = [(r[mkey] / GIB, r[pkey] / GIB) for r in rows if r.get(mkey) and r.get(pkey)]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=28, color=color, label=label,
                   zorder=3, facecolors="none" if marker == "s" else None)
        vals = [v for p in pts for v in p]
        lo = min(vals) if lo is None else min(lo, min(vals))
        hi = max(vals) if hi is None else max(hi, max(vals))
    lo, hi = (lo or 1e-3) / 1.5, (hi or 1.0) * 1.5
    xs = [lo, hi]
    ax.plot(xs, xs, color="0.3", lw=0.9, label="predicted = measured")
    ax.fill_between(xs, [x * (1 - band) for x in xs], [x * (1 + band) for x in xs], color="0.6", alpha=0.25,
                    label=f"±{band:.0%}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured (GiB = 2^30 B): max_memory_allocated / CPU tracker, or NVML process peak")
    ax.set_ylabel("predicted (GiB)")
    devices = sorted({str(r.get("device")) for r in rows})
    ax.set_title(title or f"memplan: predicted vs measured, {len(rows)} configuration(s) ({', '.join(devices)})",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    if "cuda" not in devices:
        fig.text(0.5, -0.01, "CPU profiles: tensor bytes only; device-level figures need GPU profiles",
                 ha="center", va="top", fontsize=7.5, color="0.35")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
