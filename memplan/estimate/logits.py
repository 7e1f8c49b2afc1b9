"""Logits and loss, often the single largest spike: b*s*V elements for a vocabulary V of 32k-256k.

transformers 5 (loss/loss_utils.py, ForCausalLMLoss) casts the logits to fp32 (`logits.float()`, a copy when
they are 16-bit; after prepare_model_for_kbit_training lm_head is fp32 and so are they), then
cross_entropy = log_softmax (saves its fp32 output) + nll_loss. The Trainer keeps only the loss, so the logits
die with the forward; backward holds the saved log_softmax, nll_loss's gradient and log_softmax_backward's
output at once. Per token, bytes; the copy counts are in coefficients.json.
"""
from __future__ import annotations

from memplan.estimate.activations import Ctx, coefficients
from memplan.library_facts import liger_chunk_size
from memplan.spec import ModelSpec, TrainSpec


def final_softcap(model: ModelSpec) -> bool:
    """Gemma-2 caps the final logits: tanh(logits / cap) * cap (final_logit_softcapping, default 30.0); tanh
    saves its b*s*V output for backward."""
    return model.model_type == "gemma2" and bool(model.hf_config.get("final_logit_softcapping", 30.0))


def loss_forward(model: ModelSpec, train: TrainSpec) -> int:
    e = Ctx.of(train).e
    k = coefficients()["loss"]["forward_fp32_copies"]
    upcast_copy = 4 if e != 4 else 0
    tanh_saved = e if final_softcap(model) else 0
    return int(model.vocab_size * (e + tanh_saved + upcast_copy + 4 * k))


def loss_backward(model: ModelSpec, train: TrainSpec) -> int:
    """--activation-offload all with a softcap: tanh's saved output is offloaded (TRL's NoOp scope covers the
    lm_head module only, the softcap runs after it) and the forward stash that kept it on the device is cleared by
    the hook of the loss's first backward node (trl/models/activation_offloading.py): it comes back only for tanh's
    backward. By then the loss's fp32 tensors are gone but the log_softmax output brought back for its backward,
    which TRL's bwd stash holds until the next node that unpacks (tanh's) ends: beside it the gradient scaled by
    the cap, tanh's output and its gradient, in the logits' dtype."""
    e = Ctx.of(train).e
    loss = 4 * coefficients()["loss"]["backward_fp32_copies"]
    if not final_softcap(model):
        return int(model.vocab_size * loss)
    if train.activation_offload == "all":
        return int(model.vocab_size * max(loss, 4 + 3 * e))
    return int(model.vocab_size * (loss + e))


def head_backward(model: ModelSpec, train: TrainSpec) -> int:
    """Per token, beside a trained output layer's gradient while its MmBackward0 makes it (the standard loss): the
    logits' gradient in the logits' dtype (an fp32 one from log_softmax's backward was cast by ToCopyBackward0 and
    freed). Offloading all activations, TRL's bwd stash still holds the tensor the loss's last unpacking node
    brought back (log_softmax's fp32 output; under Gemma-2's softcap tanh's output, in the logits' dtype): the
    head's own saves sit in the NoOp scope, so nothing unpacks until the final norm's backward, whose end frees it
    (trl/models/activation_offloading.py unpack_tensor_with_streams). The meta trace's live tensors (Qwen3-30B-A3B,
    lm_head trained, seed 88213 #191: the head's V x H gradient beside two b·s x V fp32 tensors)."""
    e = Ctx.of(train).e
    stash = (e if final_softcap(model) else 4) if train.activation_offload == "all" else 0
    return model.vocab_size * (e + stash)


def fused_loss(model: ModelSpec, train: TrainSpec, tokens: int) -> tuple[int, int]:
    """(forward, backward) bytes of --loss liger | cce, absolute (memplan/trace/losses.py has their sources).
    liger: grad_input (b·s x H, in the hidden dtype) computed in the forward and kept for backward, loss_1d (fp32)
    and the target mask per token, the padded shifted labels (b·(s+1) int64), and one chunk x V logits buffer
    (chunk = next_pow2(cdiv(b·s, cdiv(V, H)))). Backward returns grad_input: nothing new.
    cce: lse, neg_dot (fp32) and valids (int64) per token, logit_avg (V fp32); backward: de (b·s x H) and
    vocab_ordering (argsort: V int64, then int32).
    A trained output layer (full fine-tuning): liger's forward also makes grad_weight = zeros_like(weight), kept
    to the backward, and per chunk its legacy path's `grad_weight += mm(grad_logits.t(), x).float()` (a V x H
    product in the hidden dtype, plus its fp32 copy when 16-bit; liger_kernel/ops/fused_linear_cross_entropy.py
    0.8.5 — on sm80+ GPUs 16-bit weights take an in-place addmm instead, so this is the conservative figure the
    trace runs); cce's backward makes dc = zeros_like(c, dtype=e.dtype)."""
    from memplan.estimate.lora import head_and_embedding_grads

    e, h, v = Ctx.of(train).e, model.hidden_size, model.vocab_size
    b = train.batch_size
    head = head_and_embedding_grads(model, train)["head"] > 0
    if train.loss == "liger":
        labels = b * (train.seq_len + 1) * 8
        chunk = liger_chunk_size(tokens, v, h)
        kept = tokens * h * e + (v * h * _weight_bytes(train) if head else 0)
        product = v * h * (e + (4 if e != 4 else 0)) if head else 0
        return kept + tokens * (4 + 1) + labels + chunk * v * e + product, kept
    n = b * (train.seq_len - 1)
    saved = n * (4 + 8) + v * 4
    fwd = saved + n * 4 + n * 16 + tokens  # neg_dot; the nonzero (N, 2) int64 and the bool mask while valids forms
    return fwd, saved + tokens * h * e + v * (8 + 4) + (v * h * e if head else 0)


def _weight_bytes(train: TrainSpec) -> int:
    """The output layer's dtype as it trains (full fine-tuning: the weights' dtype)."""
    from memplan.spec import DTYPES

    return 4 if train.bits == 32 else DTYPES[train.compute_dtype]
