"""`memplan report --html`: one self-contained HTML file (no CDN, no network: plotly.min.js is inlined from the
plotly package) built from result dicts, the same objects `--json` prints:

  estimates  Estimate.to_dict() per configuration (with "model_source")
  traces     TraceResult.to_dict() plus "timeline" ([event, live_bytes, phase], downsampled), per configuration
  fit        plan.Fit.to_dict() for a single configuration judged against --gpu
  profiles   validate's profile rows (estimate vs trace vs measured) and its bars in words
  meta       memplan version, calibration, stacks, command line, creation time

This module only lays them out (tables, figures from figures.py); it computes no figure of its own. GiB = 2^30.
"""
from __future__ import annotations

import html
import json
import re

from memplan.report import figures

GIB = 2**30
CSS = """
body{margin:0 auto;max-width:1200px;padding:16px 24px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:#1d2733}h1{font-size:22px;color:#1f4e79;margin:8px 0}h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid
#e3e7eb;padding-bottom:4px}h3{font-size:14px;margin:16px 0 6px}.dim{color:#66717d}table{border-collapse:collapse;margin:6px 0;
font-size:13px}th,td{text-align:left;padding:3px 10px;border-bottom:1px solid #e3e7eb;vertical-align:top}td.num,th.num{
text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}tr.total td{font-weight:700}.yes{color:#1b7f3b;
font-weight:600}.no{color:#b3261e;font-weight:600}.fig{height:400px;border:1px solid #e3e7eb;margin:8px 0}.big{font-size:20px;
font-weight:700;color:#1f4e79}code{font-size:12px}details{margin:6px 0}summary{cursor:pointer}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def gib(n) -> str:
    """As the CLI prints GiB (commands/estimate.py `_gib`)."""
    return f"{n / GIB:,.2f}"


def _table(head: list[str], rows: list[list], cls: str = "", ident: str = "") -> str:
    attrs = (f' id="{_e(ident)}"' if ident else "") + (f' class="{_e(cls)}"' if cls else "")
    out = [f"<table{attrs}><thead><tr>"]
    out += [f'<th class="{"num" if h.endswith("GiB") or h.endswith("%") else ""}">{_e(h)}</th>' for h in head]
    out.append("</tr></thead><tbody>")
    for r in rows:
        row_cls = ""
        if r and isinstance(r[0], dict):  # {"class": ...} marker
            row_cls, r = r[0].get("class", ""), r[1:]
        out.append(f'<tr class="{_e(row_cls)}">')
        for c in r:
            text, klass, attrs = (c + ("", ""))[:3] if isinstance(c, tuple) else (c, "", "")
            out.append(f'<td class="{_e(klass)}"{attrs}>{_e(text)}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class Figures:
    """Numbered figure slots: a div and a Plotly.newPlot call each (or nothing when plotly is missing)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.calls: list[str] = []

    def add(self, fig: dict) -> str:
        if not self.enabled:
            return ""
        ident = f"fig{len(self.calls) + 1}"
        blob = json.dumps(fig, separators=(",", ":")).replace("</", "<\\/")
        self.calls.append(f'(f=>Plotly.newPlot("{ident}",f.data,f.layout,{{"displaylogo":false,"responsive":true}}))'
                          f'({blob});')
        return f'<div class="fig" id="{ident}"></div>'


def _label(est: dict, varying: list[str], many_models: bool) -> str:
    parts = [est["model"]] if many_models else []
    for k in varying:
        v = est["config"][k]
        v = ("on" if v else "off") if isinstance(v, bool) else "+".join(v) if isinstance(v, list) else v
        parts.append(f"{k}={v}")
    return " ".join(parts) or est["model"]


def _components(est: dict, sources: dict, trace: dict | None = None) -> str:
    head = ["component", "estimate GiB", "share %"] + (["trace GiB"] if trace else []) + ["source"]
    rows = []
    for c, b in est["components"].items():
        t = trace["components"].get(c) if trace else None
        if not b and not t:
            continue
        share = f"{b / est['peak_bytes']:.1%}" if est["peak_bytes"] else ""
        rows.append([c, (gib(b), "num"), (share, "num")] + ([(gib(t or 0), "num")] if trace else []) +
                    [(sources.get(c, ""), "dim")])
    if trace:  # trace categories the estimate does not have
        for c, t in trace["components"].items():
            if c not in est["components"] and t:
                rows.append([c, ("", "num"), ("", "num"), (gib(t), "num"), ("trace category", "dim")])
    rows.append([{"class": "total"}, "tensor peak", (gib(est["peak_bytes"]), "num", ' data-role="peak"'), ("", "num")] +
                ([(gib(trace["peak_bytes"]), "num", ' data-role="trace-peak"')] if trace else []) +
                [("compare with torch.cuda.max_memory_allocated", "dim")])
    for c, b in est["device_overheads"].items():
        rows.append([c, (gib(b), "num"), ("", "num")] + ([("", "num")] if trace else []) + [("device overhead", "dim")])
    rows.append([{"class": "total"}, "device total", (gib(est["device_total_bytes"]), "num", ' data-role="device-total"'),
                 ("", "num")] + ([("", "num")] if trace else []) + [("compare with nvidia-smi / NVML used", "dim")])
    return _table(head, rows)


def _phases(est: dict, trace: dict | None = None) -> str:
    rows = []
    for p, b in est["phases"].items():
        mark = " ◀ peak" if p == est["peak_phase"] else ""
        rows.append([p + mark, (gib(b), "num")] + ([(gib(trace["phases"].get(p, 0)), "num")] if trace else []))
    return _table(["phase", "estimate GiB"] + (["trace GiB"] if trace else []), rows)


def _gpus(gpus: list[dict]) -> str:
    counts = bool(gpus) and "min_gpus" in gpus[0]  # once memplan models multi-GPU runs (web/api.py gpu_verdicts)
    return _table(["GPU", "memory GiB", "headroom GiB", "fits"] + (["GPUs needed"] if counts else []) + ["source"], [
        [g["name"], (gib(g["memory_bytes"]), "num"),
         (("+" if g["headroom_bytes"] >= 0 else "−") + gib(abs(g["headroom_bytes"])), "num"),
         ("yes" if g["fits"] else "no", "yes" if g["fits"] else "no")]
        + ([("> 8" if g["min_gpus"] is None else str(g["min_gpus"]), "num")] if counts else [])
        + [(g["source"], "dim")] for g in gpus], ident="gpus")


def _fit(f: dict) -> str:
    if "error" in f:
        return f'<p class="no">{_e(f["error"])}</p>'
    b = f["budget"]
    out = [f"<p>{_e(b['label'])}: {gib(b['total_bytes'])} GiB − margin {gib(b['margin_bytes'])} GiB = "
           f"<b>{gib(b['usable_bytes'])} GiB usable</b> (judged on the device total). This configuration: "
           f"{gib(f['device_total_bytes'])} GiB → <span class=\"{'yes' if f['fits'] else 'no'}\">"
           f"{'fits' if f['fits'] else 'does not fit'}</span>.</p>",
           f"<p>largest sequence length at batch {f['config']['batch_size']}: <b>{f['max_seq_len'] or 'none'}</b> "
           f"(multiples of {f['seq_len_granularity']}); largest batch at sequence length {f['config']['seq_len']}: "
           f"<b>{f['max_batch_size'] or 'none'}</b></p>"]
    if f["options"]:
        out.append(_table(["#", "change (each alone, cheapest first)", "device GiB", "fits", "what it costs", "source"],
                          [[str(i), o["label"], (gib(o["device_total_bytes"]), "num"),
                            ("yes" if o["fits"] else "no", "yes" if o["fits"] else "no"), o["cost"], (o["source"], "dim")]
                           for i, o in enumerate(f["options"], 1)]))
    if f["combination"]:
        out.append("<p><b>no single change is enough; combined, cheapest first:</b></p><ol>" + "".join(
            f"<li>{_e(s['label'])}: device total {gib(s['device_total_bytes'])} GiB{' — fits' if s['fits'] else ''}</li>"
            for s in f["combination"]) + "</ol>")
    return "".join(out)


def _trace(tr: dict, figs: Figures) -> str:
    out = [f"<p>traced on {'real CPU tensors' if tr['device'] == 'cpu' else 'meta tensors'} in {tr['wall_s']:.1f} s: "
           f"peak <b>{gib(tr['peak_bytes'])} GiB</b> in the {_e(tr['peak_phase'])} phase (tensor bytes only).</p>"]
    if tr.get("timeline"):
        out.append(figs.add(figures.timeline(tr)))
    if tr.get("top_tensors"):
        out.append("<h3>largest live tensors at the trace's peak</h3>" + _table(
            ["GiB", "category", "shape", "dtype", "made by (module)", "phase"],
            [[(f"{t['bytes'] / GIB:.3f}", "num"), t["category"], "×".join(map(str, t["shape"])) or "scalar", t["dtype"],
              t["module"] or "-", t["phase"]] for t in tr["top_tensors"][:10]]))
    if tr.get("notes"):
        out.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in tr["notes"]) + "</ul>")
    return "".join(out)


def _profiles(rows: list[dict], bars: list[str], figs: Figures) -> str:
    def pct(v):
        return "" if v is None else f"{v:+.2f}"

    def g(v):
        return "" if v is None else gib(v)

    out = [figs.add(figures.predicted_vs_measured(rows))]
    out.append(_table(["profile", "device", "GPU", "measured GiB", "estimate GiB", "estimate error %", "trace GiB",
                       "trace error %", "measured NVML GiB", "device total GiB", "device total error %", "calibration"],
                      [[r["config"], r["device"], r["gpu"] or "", (g(r["measured_tensor_peak_bytes"]), "num"),
                        (g(r["estimate_tensor_peak_bytes"]), "num"), (pct(r["estimate_error_pct"]), "num"),
                        (g(r["trace_peak_bytes"]), "num"), (pct(r["trace_error_pct"]), "num"),
                        (g(r["measured_nvml_process_peak_bytes"]), "num"), (g(r["estimate_device_total_bytes"]), "num"),
                        (pct(r["device_total_error_pct"]), "num"), r["calibration"]] for r in rows], ident="profiles"))
    out.append("<ul>" + "".join(f"<li>{_e(b)}</li>" for b in bars) + "</ul>")
    out.append('<p class="dim">measured: torch.cuda.max_memory_allocated on CUDA, the live-bytes tracker on the CPU; '
               "error % = (predicted − measured) / measured; the rows are what <code>memplan validate --against "
               "profiles</code> writes.</p>")
    return "".join(out)


def render(doc: dict, plotly_js: str | None) -> str:
    """The whole report as one HTML string. plotly_js: the library's text, inlined (None: tables only)."""
    figs = Figures(plotly_js is not None)
    ests, traces, meta = doc["estimates"], doc.get("traces") or [], doc["meta"]
    sources = meta["sources"]
    many_models = len({e["model"] for e in ests}) > 1
    varying = meta.get("varying", [])
    body = [f"<h1>{_e(meta['title'])}</h1>",
            f'<p class="dim">memplan {_e(meta["memplan_version"])} · {_e(meta["created"])} · '
            f"<code>{_e(meta['command'])}</code></p>"]
    if not figs.enabled:
        body.append('<p class="no">plotly is not installed (pip install \'memplan[web]\'): this report has tables but '
                    "no figures.</p>")
    if len(ests) == 1:
        e, tr = ests[0], (traces[0] if traces else None)
        body.append(f'<p>{_e(e["model"])} · {e["params"]["total"] / 1e9:.2f} B params, '
                    f'{e["params"]["trainable"] / 1e6:,.1f} M trainable · {_e(meta["describe"][0])}</p>')
        body.append(f'<p>tensor peak <span class="big" id="peak" data-bytes="{e["peak_bytes"]}">{gib(e["peak_bytes"])} '
                    f'GiB</span> in the <b>{_e(e["peak_phase"])}</b> phase · device total <span class="big" '
                    f'id="device-total" data-bytes="{e["device_total_bytes"]}">{gib(e["device_total_bytes"])} GiB</span>'
                    + (f' · trace <span class="big" id="trace-peak" data-bytes="{tr["peak_bytes"]}">'
                       f'{gib(tr["peak_bytes"])} GiB</span>' if tr else "") + "</p>")
        body.append("<h2>components at the peak</h2>" + figs.add(figures.components_by_phase(e)) + _components(e, sources, tr))
        body.append("<h2>phases</h2>" + _phases(e, tr))
        if tr:
            body.append("<h2>trace: live bytes through the step</h2>" + _trace(tr, figs))
        if doc.get("fit"):
            body.append(f"<h2>fit: {_e(doc['fit'].get('budget', {}).get('label', ''))}</h2>" + _fit(doc["fit"]))
        body.append("<h2>every catalog GPU</h2>" + _gpus(doc["gpus"][0]))
        body.append("<h2>notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in e["notes"] or ["none"]) + "</ul>")
    else:
        labels = [_label(e, varying, many_models) for e in ests]
        body.append(f"<h2>{len(ests)} configurations</h2>" + figs.add(figures.components_by_config(
            ests, labels, "components at the peak, device overheads on top (GiB = 2^30 bytes)")))
        if len({e["config"]["seq_len"] for e in ests}) >= 3:  # a sequence-length sweep: one line per series
            others = [k for k in varying if k != "seq_len"]
            series = [_label(e, others, many_models) if (others or many_models) else "device total" for e in ests]
            wanted = {n.strip() for n in meta.get("line_gpus", [])}
            body.append(figs.add(figures.device_total_vs_seq(
                ests, series, [g for g in doc["gpus"][0] if g["name"] in wanted])))
        head = ["configuration", "trainable M", "peak phase", "tensor peak GiB", "device total GiB"]
        head += ["trace peak GiB", "estimate vs trace %"] if traces else []
        head += ["fits on"]
        rows = []
        for i, (e, label) in enumerate(zip(ests, labels)):
            r = [label, (f"{e['params']['trainable'] / 1e6:,.1f}", "num"), e["peak_phase"],
                 (gib(e["peak_bytes"]), "num", f' data-bytes="{e["peak_bytes"]}"'), (gib(e["device_total_bytes"]), "num")]
            if traces:
                t = traces[i]
                err = t.get("estimate_error_pct")
                r += [(gib(t["peak_bytes"]), "num"), ("" if err is None else f"{err:+.2f}", "num")]
            fits = [g["name"] for g in doc["gpus"][i] if g["fits"]]
            r.append((f"{len(fits)} GPUs, smallest {fits[0]}" if fits else "none", "dim"))
            rows.append(r)
        body.append(_table(head, rows, ident="grid"))
        body.append("<h2>each configuration</h2>")
        for i, (e, label) in enumerate(zip(ests, labels)):
            tr = traces[i] if traces else None
            body.append(f"<details><summary>{_e(label)}: {gib(e['peak_bytes'])} GiB tensor peak "
                        f"({_e(e['peak_phase'])}), {gib(e['device_total_bytes'])} GiB device total</summary>"
                        f"<p class=\"dim\">{_e(meta['describe'][i])}</p>{_components(e, sources, tr)}{_phases(e, tr)}"
                        + (_trace(tr, figs) if tr else "") +
                        "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in e["notes"]) + "</ul></details>")
    if doc.get("profiles"):
        body.append("<h2>estimate vs trace vs measured profiles</h2>" +
                    _profiles(doc["profiles"]["rows"], doc["profiles"]["bars"], figs))
    body.append("<h2>provenance</h2><ul>" + "".join(f"<li>{_e(p)}</li>" for p in meta["provenance"]) + "</ul>")
    body.append('<p class="dim">Sizes are GiB (2^30 bytes). Every figure is a memplan result object '
                "(<code>--json</code> prints the same); this file computes none and loads nothing from the network."
                "</p>")
    # the result objects themselves, machine-readable (what --json prints), for whoever receives the file
    data = json.dumps(doc, separators=(",", ":"), default=str).replace("</", "<\\/")
    script = f'<script type="application/json" id="memplan-results">{data}</script>\n'
    if figs.enabled:
        js = re.sub(r"</(script)", r"<\\/\1", plotly_js, flags=re.IGNORECASE)  # cannot end its own <script>
        script += f"<script>{js}</script>\n<script>\n" + "\n".join(figs.calls) + "\n</script>"
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(meta['title'])}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + f"\n{script}\n</body></html>\n")
