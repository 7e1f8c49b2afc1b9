"""Activation terms of a derived architecture, fitted to meta traces of the same architecture cut to 1 and 2 layers.

For one training setting (activation_key: every TrainSpec field that changes activations; not sequence length or
optimizer; the batch by its octave), trace the real training step (memplan.trace) of the model cut to L = 1 and 2
layers at three sequence lengths s and the octave's lower batch b1 (and once at its upper batch b2). Per phase, the
dynamic bytes are the trace's phase peak minus the analytic steady state of that truncated model (weights, adapters,
optimizer states: memplan.estimate, exact from the spec):

    dyn(L, b, s) = a(L) + b · (c0(L) + c1(L) · s + c2(L) · s²)   three lengths at batch b1, exactly; a from a
                                                                 fourth trace at batch b2 (middle length)
    c(L)         = c(1) + (L - 1) · (c(2) - c(1))                each further layer adds what the second added

A phase's peak is the largest of several moments' live bytes, each affine in the batch with its own intercept (the
weights' gradients of a full fine-tune at the end of backward, the saved activations before it): past the batch
where one moment overtakes another the peak bends, so a line through batches 1 and 2 misses larger batches
(Gemma-3-12B full fine-tune, batch 4: -14.6%). The batch anchors are the octave of the batch asked for, (1, 2),
(2, 4), (4, 8), ..., each fitted once (batch_anchors), as the sequence anchors are.

a holds what does not grow with the batch (bitsandbytes' dequantized weight, gradients at the end of backward,
rotary tables), c1 what grows with tokens (saved activations, logits), c2 the s² terms (eager scores, masks). The
layer step assumes the layers after the second are like the second; a first layer unlike the uniform rest (a dense
first layer followed by MoE layers) takes its step from 2 to 3 layers instead (first_layer_differs), as does a fit
with every saved tensor offloaded, whose peaks fall inside the last layer (step_from_two). A stack
whose config names mixed layer_types (Gemma-3: 5 sliding-window layers to 1 global) gets one step per kind,
from a 2-layer model whose second layer is of that kind, and each further layer
adds the step of its kind. The same fit is made for the components at
the trace's overall peak, to split the estimate's dynamic bytes into activations / logits / temporaries /
gradients.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import replace

from memplan.spec import ModelSpec, TrainSpec

DYNAMIC = ("activations", "logits_loss", "temporaries", "gradients")
PHASES = ("load", "forward", "backward", "optimizer")


# TrainSpec fields added after derived.json's schema (#11's toolbox, #13's multi-GPU), at their defaults
LATER_DEFAULTS = {"activation_offload": "off", "loss": "standard", "liger": False, "gpus": 1, "parallel": "auto",
                  "fsdp_version": 2, "offload": "none", "quant_storage": "auto"}
LATER_FIELDS = tuple(LATER_DEFAULTS)


def activation_key(model: ModelSpec, train: TrainSpec) -> str:
    """The settings a fit is valid for, and the sequence regime (below / at or above a sliding window)."""
    d = train.to_dict()
    for k in ("batch_size", "seq_len", "optimizer", "lora_alpha"):
        d.pop(k, None)
    for k in LATER_FIELDS:  # in the key only when set: fits made before they existed ran at their default
        if d.get(k) == LATER_DEFAULTS[k]:
            d.pop(k)
    parts = [f"{k}={d[k]}" for k in sorted(d)]
    batches = batch_anchors(train.batch_size)  # in the key past (1, 2): the fits made before batch octaves
    return ";".join(parts) + f";anchors={','.join(map(str, anchors(model, train.seq_len)))}" + \
        (f";batches={batches[0]},{batches[1]}" if batches != (1, 2) else "") + \
        (";layers=1,2,3" if step_from_two(model, train) else "") + \
        (";ends=analytic" if analytic_ends(model, train) else "")  # fits before layer_backward lack it


def step_from_two(model: ModelSpec, train: TrainSpec) -> bool:
    """Whether each further layer's step is fitted from 2 to 3 layers (the terms' layers_3) rather than from 1 to 2:
    a first layer unlike the rest (first_layer_differs), or every saved tensor offloaded (--activation-offload all
    without checkpointing). Offloaded, a layer keeps little on the device, and the phase peaks fall inside the last
    layer (its MLP's forward, its attention's backward) over what the layers before it kept; the 1-layer cut's
    peak is in its first layer, which saves less (its input, a frozen embedding's output, needs no gradient), so
    the 1-to-2 step adds, once per further layer, the last layer's working set over the first's rather than what a
    layer keeps: Command-R 4-bit DoRA, b6 s5254, 4 layers: +68%; OLMo-2 eager, b4 s1633 (a middle layer keeps its
    deduped attention probabilities on the device, the first and the last do not): -19%. From 2 to 3 layers the
    step is what a middle layer keeps. Without offloading the same holds wherever a cut of 1 layer peaks at
    another moment than longer ones (Command-R's row above with offloading off: 1-layer cut peaks in forward,
    4 layers +10%); that case is left at the 1-to-2 step, which the shipped catalog fits use."""
    return first_layer_differs(model) or (
        train.activation_offload == "all" and not train.gradient_checkpointing and model.num_layers > 2)


def analytic_ends(model: ModelSpec, train: TrainSpec) -> bool:
    """Whether the estimate adds the end-of-backward moment analytically (estimate/derived.py: a trained
    embedding) beside the loss's (not under --activation-offload all), so the fit leaves it out (layer_backward)."""
    from memplan.estimate.derived import end_of_backward

    return train.activation_offload != "all" and end_of_backward(model, train) is not None


def layer_backward(spec: ModelSpec, train: TrainSpec, dyn: dict) -> float:
    """A cut's traced backward dyn bytes without the end-of-backward moment, which the estimate adds analytically
    (estimate/derived.py). A cut whose backward peaks there (within 0.1% and the embedding's incoming b·s·H
    gradient, which rides along: DeepSeek-V2-Lite full fine-tune, every anchor) carries a constant (all gradients,
    a tied head's twice) that the fit would spread over the batch and sequence terms wherever the peak switches
    moments between anchors: Gemma-3-4B fp32 full fine-tune,
    checkpointed, 4 layers, b3 s1092: the b2 s1024 anchor peaks at the end, the others at the loss, +21.4%.
    Such a row gets the loss's moment instead (the forward's traced peak plus what the loss's backward adds),
    the other moment the estimate adds analytically; a layer moment below the end's is not seen in that row."""
    from memplan.estimate.derived import end_of_backward, loss_backward_growth

    ends = end_of_backward(spec, train)
    tail = train.batch_size * train.seq_len * spec.hidden_size * 4  # the embedding's incoming gradient, fp32 at most
    if train.activation_offload == "all" or ends is None or dyn["backward"] > 1.001 * sum(ends.values()) + tail:
        return dyn["backward"]
    return min(dyn["backward"], dyn["forward"] + loss_backward_growth(spec, train))


def first_layer_differs(model: ModelSpec) -> bool:
    """A first layer unlike the uniform rest (DeepSeek-V2's first_k_dense_replace = 1: a dense MLP, then MoE).
    Its step is fitted from 2 to 3 layers: from 1 to 2 it would count, once per further layer, the difference
    between the two kinds' transients (the MoE experts' working set over the dense MLP's), which only the widest
    layer makes once (DeepSeek-V2-Lite, 4 layers: +16.5% with the 1-to-2 step)."""
    return len(model.layers) == 2 and model.layers[0][0] == 1 and model.num_layers > 2


def batch_anchors(batch: int) -> tuple[int, int]:
    """(b1, b2): the octave of `batch` (b1 < batch <= b2, powers of two), (1, 2) for batches 1 and 2."""
    top = max(2, 1 << (batch - 1).bit_length())
    return top // 2, top


def anchors(model: ModelSpec, seq_len: int) -> tuple[int, int, int]:
    """Three sequence lengths spanning the octave of seq_len (up to the next power of two B: B/4 .. B), inside the
    regime of seq_len: a sliding window w changes the attention path at s >= w. Each octave is fitted once."""
    top = max(64, 1 << (seq_len - 1).bit_length())
    lo, hi = top // 4, top
    w = model.hf_config.get("sliding_window")
    if isinstance(w, int) and w > 8:
        if seq_len >= w:
            lo = max(lo, w)
            if hi - lo < 2:
                lo, hi = w, 2 * w
        else:
            hi = min(hi, w - 1)
            if hi - lo < 2:
                lo, hi = w // 4, w - 1
    return lo, (lo + hi) // 2, hi


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
    b1, b2 = batch_anchors(train.batch_size)
    t0 = time.perf_counter()
    types = layer_types(model.hf_config)
    variants = {"layers_1": [types[0]] if types else None, "layers_2": [types[0]] * 2 if types else None}
    if first_layer_differs(model) or (step_from_two(model, train) and not types):  # mixed kinds: 1-to-2 steps
        variants["layers_3"] = None
    cuts = "1, 2 and 3" if "layers_3" in variants else "1 and 2"
    print(f"memplan: deriving the activation terms of {model.model_type} for these settings "
          f"(meta traces of {cuts} layers at seq {', '.join(map(str, seqs))}, batch {b1} and {b2}; cached "
          "afterwards)", file=sys.stderr)
    for t in dict.fromkeys(types[1:]) if types else ():  # each other layer kind, after a first layer
        if t != types[0]:
            variants[f"step:{t}"] = [types[0], t]
    fitted = {}
    for label, kinds in variants.items():
        n_layers = {"layers_1": 1, "layers_3": 3}.get(label, 2)
        cfg = truncated(model.hf_config, n_layers)
        if kinds:
            cfg["layer_types"] = list(kinds)
        spec = replace(spec_from_model(build_meta(cfg), cfg, model.name, model.source), hf_config=cfg)
        rows = []
        for s, b in [(s, b1) for s in seqs] + [(seqs[1], b2)]:
            t = train.with_(seq_len=s, batch_size=b)
            static, states = steady_static(spec, t)
            base = sum(static.values())
            r = run_trace(spec, t, keep_timeline=False, steps=1, warm_optimizer=True)  # = 2 steps' peaks
            dyn = {p: r.phases[p] - base - (states if p != "load" else 0) for p in PHASES}
            dyn["backward"] = layer_backward(spec, t, dyn)
            comps = {c: r.components.get(c, 0) for c in DYNAMIC}
            rows.append((dyn, comps, r.peak_phase))

        def terms(i: int, key: str) -> list[float]:
            """[a, c0, c1, c2]: a what does not grow with the batch (the line through dyn(b1) and dyn(b2) at the
            middle anchor, at batch 0), c0 + c1 s + c2 s² per sequence of the batch."""
            ys = [row[i][key] for row in rows]
            a = (b2 * ys[1] - b1 * ys[3]) / (b2 - b1)
            return [a] + _solve3(seqs, [(y - a) / b1 for y in ys[:3]])

        fitted[label] = {
            "phases": {p: terms(0, p) for p in PHASES},
            "components": {c: terms(1, c) for c in DYNAMIC},
            "peak_phase": rows[2][2],
        }
    out = {"anchors": list(seqs), "batches": [b1, b2], **fitted, "seconds": round(time.perf_counter() - t0, 2)}
    if types:  # how many layers of each kind follow the first one
        out["layer_counts"] = {t: types[1:].count(t) for t in dict.fromkeys(types[1:])}
        out["first_layer"] = types[0]
    return out


def layer_types(cfg: dict) -> list[str] | None:
    """transformers' per-layer kinds (layer_types: sliding / full attention ...) when they are not all alike; the
    config class derives them (Gemma-3 from sliding_window_pattern), so ask it."""
    import transformers

    kwargs = copy.deepcopy({k: v for k, v in cfg.items() if k != "model_type"})  # transformers edits nested dicts
    types = getattr(transformers.AutoConfig.for_model(cfg["model_type"], **kwargs), "layer_types", None)
    n = cfg.get("num_hidden_layers")
    if isinstance(types, list) and len(types) == n and len(set(map(str, types))) > 1:
        return [str(t) for t in types]
    return None


def evaluate(terms: dict, kind: str, name: str, num_layers: int, batch: int, seq: int) -> float:
    """dyn bytes of phase (kind="phases") or component (kind="components") `name` for the full model: the first
    layer's terms plus, for each further layer, the step its kind adds (mixed stacks: one step per kind)."""
    c1, c2 = terms["layers_1"][kind][name], terms["layers_2"][kind][name]
    if "layers_3" in terms and num_layers > 1:  # a first layer unlike the rest: step from 2 to 3 layers
        c3 = terms["layers_3"][kind][name]
        c = [b + (num_layers - 2) * (t - b) for b, t in zip(c2, c3)]
        if len(c) == 3:
            c = [c[0], 0.0, c[1], c[2]]
        return c[0] + batch * (c[1] + c[2] * seq + c[3] * seq * seq)
    counts = terms.get("layer_counts") or {None: num_layers - 1}
    c = list(c1)
    for layer_kind, n in counts.items():
        step_of = terms.get(f"step:{layer_kind}", terms["layers_2"]) if layer_kind != terms.get("first_layer") \
            else terms["layers_2"]
        c = [ci + n * (b - a) for ci, a, b in zip(c, c1, step_of[kind][name])]
    if len(c) == 3:  # [c0, c1, c2]: the constant did not scale with the batch
        c = [c[0], 0.0, c[1], c[2]]
    return c[0] + batch * (c[1] + c[2] * seq + c[3] * seq * seq)
