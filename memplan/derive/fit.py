"""Activation terms of a derived architecture, fitted to meta traces of the same architecture cut to 1 and 2 layers.

For one training setting (activation_key: every TrainSpec field that changes activations; not batch, sequence
length or optimizer), trace the real training step (memplan.trace, batch 1) of the model cut to L = 1 and 2
layers at three sequence lengths s. Per phase, the dynamic bytes are the trace's phase peak minus the analytic
steady state of that truncated model (weights, adapters, optimizer states: memplan.estimate, exact from the spec):

    dyn(L, b, s) = c0(L) + b · (c1(L) · s + c2(L) · s²)     three points per L: c0, c1, c2 exactly
    c(L)         = c(1) + (L - 1) · (c(2) - c(1))           each further layer adds what the second one added

c0 holds what does not grow with tokens (bitsandbytes' dequantized weight, gradients at the end of backward),
c1 what grows with tokens (saved activations, logits), c2 the s² terms (eager scores, masks). The layer step
assumes the layers after the second are like the second (true for uniform stacks and for a dense first layer
followed by MoE layers; a stack mixing layer kinds further on — e.g. Gemma-3's 1 global : 5 sliding layers —
is extrapolated from its first two layers, which the output notes). The same fit is made for the components at
the trace's overall peak, to split the estimate's dynamic bytes into activations / logits / temporaries /
gradients.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace

from memplan.spec import ModelSpec, TrainSpec

DYNAMIC = ("activations", "logits_loss", "temporaries", "gradients")
PHASES = ("load", "forward", "backward", "optimizer")


def activation_key(model: ModelSpec, train: TrainSpec) -> str:
    """The settings a fit is valid for, and the sequence regime (below / at or above a sliding window)."""
    d = train.to_dict()
    for k in ("batch_size", "seq_len", "optimizer", "lora_alpha"):
        d.pop(k, None)
    parts = [f"{k}={d[k]}" for k in sorted(d)]
    return ";".join(parts) + f";anchors={','.join(map(str, anchors(model, train.seq_len)))}"


def anchors(model: ModelSpec, seq_len: int) -> tuple[int, int, int]:
    """Three sequence lengths in the regime of seq_len: a sliding window changes the attention path at s >= w."""
    w = model.hf_config.get("sliding_window")
    if isinstance(w, int) and w > 8:
        return (w, 2 * w, 4 * w) if seq_len >= w else (w // 4, w // 2, w - 1)
    return (1024, 2048, 4096)


def steady_static(spec: ModelSpec, train: TrainSpec) -> tuple[dict, int]:
    """(weights + adapters by component, optimizer-state bytes) of a spec, from the analytic estimate."""
    from memplan.estimate import lora, optimizer, weights

    w = weights.weights(spec, train)
    tr = lora.trainable(spec, train)
    static = {**w, "lora": 0 if train.method == "full" else tr["bytes"]}
    return static, optimizer.states(spec, train, tr["params"], tr["bytes"])


def _solve3(xs, ys) -> list[float]:
    """c0, c1, c2 of c0 + c1 x + c2 x² through three points (Lagrange form, exact)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d0, d1, d2 = (x0 - x1) * (x0 - x2), (x1 - x0) * (x1 - x2), (x2 - x0) * (x2 - x1)
    a = y0 / d0 + y1 / d1 + y2 / d2
    b = -(y0 * (x1 + x2) / d0 + y1 * (x0 + x2) / d1 + y2 * (x0 + x1) / d2)
    c = y0 * x1 * x2 / d0 + y1 * x0 * x2 / d1 + y2 * x0 * x1 / d2
    return [c, b, a]


def fit(model: ModelSpec, train: TrainSpec) -> dict:
    """Trace, fit and return the terms (JSON-ready). Imports torch."""
    import logging

    from memplan.derive.spec import build_meta, spec_from_model, truncated
    from memplan.trace import run_trace

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    seqs = anchors(model, train.seq_len)
    print(f"memplan: deriving the activation terms of {model.model_type} for these settings "
          f"(meta traces of 1 and 2 layers at seq {', '.join(map(str, seqs))}; cached afterwards)", file=sys.stderr)
    t0 = time.perf_counter()
    per_layer_count = {}
    for n_layers in (1, 2):
        cfg = truncated(model.hf_config, n_layers)
        spec = replace(spec_from_model(build_meta(model.hf_config, n_layers), cfg, model.name, model.source),
                       hf_config=cfg)
        rows = []
        for s in seqs:
            t = train.with_(seq_len=s, batch_size=1)
            static, states = steady_static(spec, t)
            base = sum(static.values())
            r = run_trace(spec, t, keep_timeline=False)
            dyn = {p: r.phases[p] - base - (states if p != "load" else 0) for p in PHASES}
            comps = {c: r.components.get(c, 0) for c in DYNAMIC}
            rows.append((dyn, comps, r.peak_phase))
        per_layer_count[n_layers] = {
            "phases": {p: _solve3(seqs, [row[0][p] for row in rows]) for p in PHASES},
            "components": {c: _solve3(seqs, [row[1][c] for row in rows]) for c in DYNAMIC},
            "peak_phase": rows[-1][2],
        }
    return {"anchors": list(seqs), "layers_1": per_layer_count[1], "layers_2": per_layer_count[2],
            "seconds": round(time.perf_counter() - t0, 2)}


def evaluate(terms: dict, kind: str, name: str, num_layers: int, batch: int, seq: int) -> float:
    """dyn bytes of phase (kind="phases") or component (kind="components") `name` for the full model."""
    c1, c2 = terms["layers_1"][kind][name], terms["layers_2"][kind][name]
    c = [a + (num_layers - 1) * (b - a) for a, b in zip(c1, c2)]
    return c[0] + batch * (c[1] * seq + c[2] * seq * seq)
