"""Logits and loss, often the single largest spike: b*s*V elements for a vocabulary V of 32k-256k.

transformers 5 (loss/loss_utils.py, ForCausalLMLoss) casts the logits to fp32 (`logits.float()`, a copy when
they are 16-bit; after prepare_model_for_kbit_training lm_head is fp32 and so are they), then
cross_entropy = log_softmax (saves its fp32 output) + nll_loss. The Trainer keeps only the loss, so the logits
die with the forward; backward holds the saved log_softmax, nll_loss's gradient and log_softmax_backward's
output at once. Per token, bytes; the copy counts are in coefficients.json.
"""
from __future__ import annotations

from memplan.estimate.activations import Ctx, coefficients
from memplan.spec import ModelSpec, TrainSpec


def _softcap(model: ModelSpec) -> bool:
    """Gemma-2 caps the final logits: tanh(logits / cap) * cap (final_logit_softcapping, default 30.0); tanh
    saves its b*s*V output for backward."""
    return model.model_type == "gemma2" and bool(model.hf_config.get("final_logit_softcapping", 30.0))


def loss_forward(model: ModelSpec, train: TrainSpec) -> int:
    e = Ctx.of(train).e
    k = coefficients()["loss"]["forward_fp32_copies"]
    upcast_copy = 4 if e != 4 else 0
    tanh_saved = e if _softcap(model) else 0
    return int(model.vocab_size * (e + tanh_saved + upcast_copy + 4 * k))


def loss_backward(model: ModelSpec, train: TrainSpec) -> int:
    tanh_saved = Ctx.of(train).e if _softcap(model) else 0
    return int(model.vocab_size * (4 * coefficients()["loss"]["backward_fp32_copies"] + tanh_saved))
