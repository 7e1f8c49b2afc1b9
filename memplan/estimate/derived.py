"""The estimate of a derived architecture (memplan/derive): no hand-written activation formula exists for it, so
its dynamic bytes per phase — saved activations, logits and loss, temporaries, gradients — come from the terms
fitted to meta traces of the same architecture (memplan/derive/fit.py); weights, adapters and optimizer states
are the analytic components (weights.py, lora.py, optimizer.py) on the derived ModelSpec, which is exact.
"""
from __future__ import annotations

from memplan.derive import activation_terms
from memplan.derive.fit import DYNAMIC, evaluate
from memplan.estimate import lora, optimizer, weights


def phase_components(model, train) -> tuple[dict[str, dict[str, int]], list[str]]:
    """{phase: {component: bytes}} for load, forward, backward, optimizer, and the notes to print."""
    terms = activation_terms(model, train)
    b, s, L = train.batch_size, train.seq_len, model.num_layers
    w = weights.weights(model, train)
    tr = lora.trainable(model, train)
    static = {**w, "lora": 0 if train.method == "full" else tr["bytes"]}
    states = optimizer.states(model, train, tr["params"], tr["bytes"])
    parts = {c: max(0.0, evaluate(terms, "components", c, L, b, s)) for c in DYNAMIC}
    share = sum(parts.values()) or 1.0
    out = {"load": dict(static, temporaries=weights.load_transient(model, train))}
    for phase in ("forward", "backward", "optimizer"):
        dyn = max(0, int(evaluate(terms, "phases", phase, L, b, s)))
        if phase == "optimizer":  # gradients of every trainable + the step's own temporaries: analytic
            comp = dict(static, optimizer_states=states, gradients=tr["bytes"],
                        temporaries=optimizer.step_temporaries(train, tr["bytes"], model))
        else:  # the fitted dynamic bytes, split as at the traced peak
            comp = dict(static, optimizer_states=states)
            for c, v in parts.items():
                comp[c] = comp.get(c, 0) + int(dyn * v / share)
        out[phase] = comp
    # The loss's backward, analytic for any architecture (logits.py: transformers' ForCausalLMLoss, or a fused
    # loss): the forward's saved set beside what the loss keeps for and makes in its backward. That moment, before
    # any layer's gradient, is the forward's peak less the loss's forward working set (the forward peaks at its loss,
    # or a little above it in the last layer: then this errs high). Cuts of 1 and 2 layers whose backward peaks
    # elsewhere miss it once more layers' saved tensors (or checkpointed inputs) overtake: Gemma-3-12B full
    # fine-tune with CCE -9.4%, StarCoder2-7B QLoRA checkpointed -4.3% at 4 layers (seed 6719 #270, #43).
    # Offloading all activations keeps the saved set off the device: not this moment.
    if train.activation_offload != "all":
        at_loss = dict(out["forward"])
        at_loss["logits_loss"] = at_loss.get("logits_loss", 0) + loss_backward_growth(model, train)
        if sum(at_loss.values()) > sum(out["backward"].values()):
            out["backward"] = at_loss
    # The end of backward, analytic for any architecture (as estimate/__init__.py's EmbeddingBackward0 moment):
    # every trainable's gradient exists and a trained embedding's is being made, tied to the head: the head's
    # gradient waiting beside it, then their sum. The fit cannot extrapolate this moment in layers when a shallower
    # cut peaks elsewhere (Gemma-3-27B full fine-tune, 1-2 layers peak at the loss; 4 layers here: -4.6%).
    ends = end_of_backward(model, train)
    if ends is not None:
        end = dict(static, optimizer_states=states, **ends)
        if sum(end.values()) > sum(out["backward"].values()):
            out["backward"] = end
    lo, hi = terms["anchors"][0], terms["anchors"][-1]
    where = "inside" if lo <= s <= hi else "extrapolated beyond"
    b1, b2 = terms.get("batches", (1, 2))
    cuts = "1, 2 and 3" if "layers_3" in terms else "1 and 2"
    notes = [f"activations, logits and temporaries of this derived architecture: fitted to meta traces of its first "
             f"{cuts} layers at seq {', '.join(map(str, terms['anchors']))} ({where} the fitted range) and batch "
             f"{b1} and {b2}, extrapolated to {L} layers"]
    return out, notes


def loss_backward_growth(model, train) -> int:
    """What the loss's backward adds over the forward's peak (the at-the-loss moment above): transformers'
    ForCausalLMLoss or a fused loss (logits.py), for the batch's tokens."""
    from memplan.estimate.logits import fused_loss, loss_backward, loss_forward

    tokens = train.batch_size * train.seq_len
    if train.loss != "standard":
        fwd, bwd = fused_loss(model, train, tokens)
        return bwd - fwd
    return tokens * (loss_backward(model, train) - loss_forward(model, train))


def end_of_backward(model, train) -> dict | None:
    """The dynamic bytes of the end-of-backward moment (above), or None when no embedding is trained: every
    trainable's gradient, and a tied head's gradient waiting beside the embedding's, then their sum."""
    ends = lora.head_and_embedding_grads(model, train)
    if not ends["embed"]:
        return None
    tr = lora.trainable(model, train)
    return {"gradients": tr["bytes"], "temporaries": 2 * ends["head"] if ends["tied"] else 0}
