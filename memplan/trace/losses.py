"""Fused linear cross-entropy losses with their GPU memory signature, for the trace (meta or CPU tensors).

Liger Kernel and Cut Cross-Entropy run Triton kernels (CUDA only), so the trace models what their Python drivers
allocate, read from their source (liger-kernel 0.8.5, cut-cross-entropy 25.1.1); the kernels' own registers and
shared memory are not tensors. `recipe.compute_loss` calls these exactly where a GPU run calls the libraries:

- liger: liger_kernel/transformers/model/loss_utils.py LigerForCausalLMLoss (labels padded by one and shifted:
  a (b, s+1) int64 tensor viewed) -> LigerFusedLinearCrossEntropyFunction (ops/fused_linear_cross_entropy.py).
  Its forward computes the loss *and* the gradients chunk by chunk: grad_input = zeros_like(input) (b·s x H),
  loss_1d (b·s fp32), target_mask (bool); chunk_size = next_power_of_2(cdiv(b·s, cdiv(V, H))) (at most b·s)
  rows of logits (chunk x V, in the input dtype) at a time, overwritten in place by their gradient, then
  grad_input[chunk] = grad_logits @ weight (a chunk x H product, copied in). It saves only grad_input (plus
  grad_weight when the head is trained) for the backward, which returns it (grad_output is 1.0: no scaling).
- cce: cut_cross_entropy/cce.py cce_linear_cross_entropy(shift=1): valids = nonzero(targets[..., 1:] !=
  ignore) (int64 (N, 2) -> int32 -> int64 (N) after sum; N = b·(s-1), every label valid here), lse (N fp32),
  locks (cdiv(N, 128) uint32), logit_avg (V fp32, filter_eps "auto" while training), neg_dot (N fp32, the nll
  in place); saves e, c, lse, targets, valids, logit_avg. Backward: vocab_ordering = argsort(logit_avg) (V
  int64 -> int32), de = zeros_like(e) (b·s x H), dc only if the classifier is trained. No b·s·V tensor at all.
With real CPU tensors the loss value and gradients come from an untracked reference computation.
"""
from __future__ import annotations

from memplan.trace.kernels import _is_meta, _untracked
from memplan.library_facts import liger_chunk_size


def _reference(hidden, weight, labels, softcap):
    """The loss and its gradients, computed where the tracker does not look (real tensors only)."""
    import torch

    with _untracked(), torch.enable_grad():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(weight.requires_grad)
        logits = (h @ w.t()).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
        grads = torch.autograd.grad(loss, [h] + ([w] if w.requires_grad else []))
    return loss.detach(), grads


def make_liger():
    import torch

    class LigerFLCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, target, softcap):
            bt, hdim = x.shape
            vocab = weight.shape[0]
            chunk = liger_chunk_size(bt, vocab, hdim)
            grad_input = torch.zeros_like(x)
            grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
            loss_1d = torch.zeros(bt, dtype=torch.float32, device=x.device)
            target_mask = target != -100
            # on CUDA (_can_use_mm_out: grad mode is off inside the Function, input and weight of one dtype) one
            # chunk x V logits buffer is reused by every chunk and torch.mm writes grad_input[chunk] in place
            logits_storage = torch.empty((chunk, vocab), dtype=x.dtype, device=x.device)
            if grad_weight is not None:  # grad_weight += (grad_logits.t() @ x_chunk).float(), chunk by chunk
                grad_weight += torch.empty((vocab, hdim), dtype=x.dtype, device=x.device).float()
            del logits_storage
            del target_mask
            loss = torch.sum(loss_1d) / bt  # reduction "mean"
            if not _is_meta(x):
                value, grads = _reference(x, weight, target, softcap)
                with _untracked(), torch.no_grad():
                    loss.copy_(value)
                    grad_input.copy_(grads[0])
                    if grad_weight is not None:
                        grad_weight.copy_(grads[1])
            ctx.save_for_backward(grad_input, grad_weight)
            return loss

        @staticmethod
        def backward(ctx, grad_output):
            grad_input, grad_weight = ctx.saved_tensors
            return grad_input, grad_weight, None, None

    def liger_loss(hidden, weight, labels, softcap=None):
        # LigerForCausalLMLoss: pad + shift the labels, flatten
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        return LigerFLCE.apply(hidden.view(-1, hidden.shape[-1]), weight, shifted.view(-1), softcap)

    return liger_loss


def make_cce():
    import torch

    class CCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, e, c, targets, valids, softcap):
            n = valids.shape[0]
            lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=e.device)
            locks = torch.zeros((-(-n // 128),), dtype=torch.int32, device=e.device)  # uint32 in CCE: 4 B too
            logit_avg = torch.zeros((c.shape[0],), dtype=torch.float32, device=e.device)
            neg_dot = torch.zeros((n,), dtype=torch.float32, device=e.device)
            del locks
            nll = neg_dot.add_(lse)
            loss = nll.mean()
            if not _is_meta(e):
                value, _ = _reference(e, c, targets, softcap)
                with _untracked(), torch.no_grad():
                    loss.copy_(value)
            ctx.save_for_backward(e, c, lse, targets, valids, logit_avg)
            ctx.softcap = softcap
            return loss

        @staticmethod
        def backward(ctx, grad_out):
            e, c, lse, targets, valids, logit_avg = ctx.saved_tensors
            vocab_ordering = torch.argsort(logit_avg).to(torch.int32)
            de = torch.zeros_like(e)
            dc = torch.zeros_like(c, dtype=e.dtype) if ctx.needs_input_grad[1] else None
            if not _is_meta(e):
                _, grads = _reference(e, c, targets, ctx.softcap)
                with _untracked(), torch.no_grad():
                    de.copy_(grads[0])
                    if dc is not None:
                        dc.copy_(grads[1])
            del vocab_ordering
            return de, dc, None, None, None

    def cce_loss(hidden, weight, labels, softcap=None):
        b, s = labels.shape
        e = hidden.contiguous().flatten(0, -2)
        # _build_flat_valids(shift=True): nonzero of the shifted labels (every label valid: b·(s-1) rows)
        mask = labels[..., 1:] != -100
        valids = torch.empty((b * (s - 1), 2), dtype=torch.int64, device=labels.device).to(torch.int32)
        del mask
        valids = valids.sum(1)
        if not _is_meta(labels):
            with _untracked():
                flat = torch.arange(b * s, device=labels.device).view(b, s)[:, :-1].reshape(-1)
                valids.copy_(flat)
        return CCE.apply(e, weight, labels.flatten(), valids, softcap)

    return cce_loss
