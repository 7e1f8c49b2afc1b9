"""Plotly figures as plain dicts ({"data": [...], "layout": {...}}), built from result dicts: the same figure in
`memplan serve` (the page hands it to Plotly.react) and in `memplan report --html`. No plotly import: a figure is
JSON, and the page and the report each load plotly.min.js from the plotly package. GiB = 2^30 bytes."""
from __future__ import annotations

from pathlib import Path

GIB = 2**30
# One colour per component, stable across figures (tableau-like, readable on white).
COLORS = {
    "weights_quantized": "#4e79a7", "quant_state": "#a0cbe8", "weights_unquantized": "#59a14f",
    "lora": "#f28e2b", "gradients": "#ffbe7d", "optimizer_states": "#e15759", "activations": "#76b7b2",
    "logits_loss": "#b07aa1", "temporaries": "#9c755f", "other": "#bab0ac",
    "cuda_context": "#d4d4d4", "cublas_workspace": "#bdbdbd", "allocator_overhead": "#969696",
}
PHASE_COLORS = {"load": "#eeeeee", "forward": "#cfe3f7", "backward": "#f7dccf", "optimizer": "#d8f0d2"}
_FONT = {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12}


def _gib(n) -> float:
    return round(n / GIB, 4)


def _layout(title: str, **extra) -> dict:
    out = {"title": {"text": title, "font": {"size": 14}}, "barmode": "stack", "font": _FONT,
           "margin": {"l": 60, "r": 20, "t": 40, "b": 50}, "legend": {"traceorder": "normal"},
           "paper_bgcolor": "white", "plot_bgcolor": "white", "hovermode": "closest"}
    out.update(extra)
    return out


def components_by_phase(est: dict) -> dict:
    """Stacked bar: the tensor bytes of each component in each phase (estimate.to_dict()), peak phase marked."""
    phases = list(est["phases"])
    comps = [c for c in est["components"] if any(est["phase_components"][p].get(c) for p in phases)]
    labels = [f"{p} ◀ peak" if p == est["peak_phase"] else p for p in phases]
    data = [{"type": "bar", "name": c, "x": labels, "y": [_gib(est["phase_components"][p].get(c, 0)) for p in phases],
             "marker": {"color": COLORS.get(c, "#888")},
             "hovertemplate": f"{c}: %{{y:.2f}} GiB<extra>%{{x}}</extra>"} for c in comps]
    return {"data": data, "layout": _layout(
        f"{est['model']}: tensor bytes by phase (peak {_gib(est['peak_bytes']):.2f} GiB in {est['peak_phase']})",
        yaxis={"title": {"text": "GiB (2^30 bytes)"}, "rangemode": "tozero", "gridcolor": "#eee"})}


def components_by_config(ests: list[dict], labels: list[str], title: str) -> dict:
    """Stacked bar: the components at the peak of each configuration of a grid or sweep, device overheads on top."""
    comps = [c for c in ests[0]["components"] if any(e["components"].get(c) for e in ests)]
    over = [c for c in ests[0].get("device_overheads", {}) if any(e["device_overheads"].get(c) for e in ests)]
    data = [{"type": "bar", "name": c, "x": labels, "y": [_gib(e["components"].get(c, 0)) for e in ests],
             "marker": {"color": COLORS.get(c, "#888")}, "hovertemplate": f"{c}: %{{y:.2f}} GiB<extra></extra>"}
            for c in comps]
    data += [{"type": "bar", "name": c, "x": labels, "y": [_gib(e["device_overheads"].get(c, 0)) for e in ests],
              "marker": {"color": COLORS.get(c, "#ccc"), "pattern": {"shape": "/"}},
              "hovertemplate": f"{c}: %{{y:.2f}} GiB<extra></extra>"} for c in over]
    return {"data": data, "layout": _layout(title, yaxis={"title": {"text": "GiB (2^30 bytes)"}, "gridcolor": "#eee"},
                                            xaxis={"type": "category", "automargin": True})}


def timeline(trace: dict) -> dict:
    """Live tensor bytes through a traced step, phases shaded (trace rows: [event, live_bytes, phase])."""
    rows = trace["timeline"]
    shapes, start, phase = [], rows[0][0] if rows else 0, rows[0][2] if rows else None
    for event, _, p in rows[1:] + [[rows[-1][0] + 1 if rows else 1, 0, None]]:
        if p != phase:
            shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": start, "x1": event, "y0": 0, "y1": 1,
                           "fillcolor": PHASE_COLORS.get(phase, "#f4f4f4"), "opacity": 0.6, "line": {"width": 0},
                           "layer": "below", "label": {"text": phase, "textposition": "top center",
                                                       "font": {"size": 10}}})
            start, phase = event, p
    data = [{"type": "scatter", "mode": "lines", "line": {"shape": "hv", "color": "#1f4e79", "width": 1.2},
             "name": "live tensor bytes", "x": [r[0] for r in rows], "y": [_gib(r[1]) for r in rows],
             "hovertemplate": "event %{x}: %{y:.3f} GiB<extra></extra>"}]
    layout = _layout(f"{trace['model']}: live tensor bytes through {trace.get('steps', 2)} traced steps "
                     f"(peak {_gib(trace['peak_bytes']):.3f} GiB in {trace['peak_phase']})",
                     shapes=shapes, showlegend=False,
                     xaxis={"title": {"text": "allocation / release event"}},
                     yaxis={"title": {"text": "live tensor GiB (2^30 bytes)"}, "rangemode": "tozero",
                            "gridcolor": "#eee"})
    return {"data": data, "layout": layout}


def predicted_vs_measured(rows: list[dict]) -> dict:
    """Grouped bars per profile: estimate, trace and the measured tensor peak (validate's profile rows)."""
    labels = [r["config"] for r in rows]
    series = [("estimate", "estimate_tensor_peak_bytes", "#4e79a7"), ("trace", "trace_peak_bytes", "#f28e2b"),
              ("measured", "measured_tensor_peak_bytes", "#59a14f")]
    data = [{"type": "bar", "name": name, "x": labels, "marker": {"color": color},
             "y": [_gib(r[key]) if r.get(key) is not None else None for r in rows],
             "hovertemplate": f"{name}: %{{y:.3f}} GiB<extra>%{{x}}</extra>"} for name, key, color in series]
    return {"data": data, "layout": _layout("tensor peak: estimate vs trace vs measured profile", barmode="group",
                                            yaxis={"title": {"text": "GiB (2^30 bytes)"}, "gridcolor": "#eee"},
                                            xaxis={"type": "category", "automargin": True})}


def plotly_js() -> Path | None:
    """plotly.min.js as the plotly Python package ships it (no CDN); None when plotly is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("plotly")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


def plotly_js_version(text: str) -> str:
    """The version in plotly.min.js's banner ('* plotly.js v4.1.1'), or 'unknown'."""
    import re

    m = re.search(r"plotly\.js v([0-9][^\s*]*)", text[:500])
    return m.group(1) if m else "unknown"


def device_total_vs_seq(ests: list[dict], series: list[str], gpus: list[dict]) -> dict:
    """Lines: device total vs sequence length (log 2 axis), one line per model × the other varying settings
    (`series`: labels, one per estimate), with the memory of the given catalog GPUs as dashed lines."""
    lines: dict[str, list] = {}
    for e, label in zip(ests, series):
        lines.setdefault(label, []).append((e["config"]["seq_len"], e["device_total_bytes"]))
    data = [{"type": "scatter", "mode": "lines+markers", "name": label,
             "x": [s for s, _ in sorted(pts)], "y": [_gib(b) for _, b in sorted(pts)],
             "hovertemplate": f"{label}<br>seq %{{x}}: %{{y:.2f}} GiB<extra></extra>"} for label, pts in lines.items()]
    top = max(e["device_total_bytes"] for e in ests)
    shapes, notes = [], []
    for g in gpus:
        if g["memory_bytes"] <= top * 1.6:  # capacities in or just above the data's range
            y = _gib(g["memory_bytes"])
            shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y,
                           "line": {"dash": "dash", "color": "#777", "width": 1}})
            notes.append({"xref": "paper", "x": 0.01, "y": y, "yanchor": "bottom", "showarrow": False,
                          "text": f"{g['name']} {y:.0f} GiB", "font": {"size": 10, "color": "#555"}})
    seqs = sorted({e["config"]["seq_len"] for e in ests})
    return {"data": data, "layout": _layout(
        "estimated device total vs sequence length (GiB = 2^30 bytes)", shapes=shapes, annotations=notes,
        xaxis={"type": "log", "title": {"text": "sequence length (tokens)"}, "tickvals": seqs,
               "ticktext": [f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s) for s in seqs]},
        yaxis={"title": {"text": "device total GiB"}, "rangemode": "tozero", "gridcolor": "#eee"})}
