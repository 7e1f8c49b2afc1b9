"""Liger Kernel's RMSNorm and SwiGLU/GeGLU (--liger on) with their GPU memory signature, for the trace.

Liger's kernels are Triton (CUDA only). On a GPU the recipe applies them with liger-kernel's own
`_apply_liger_kernel_to_instance` (recipe.apply_liger); on meta/CPU the trace swaps the same modules' forwards for
these models, read from liger-kernel 0.8.5's source:
- LigerRMSNormFunction (ops/rms_norm.py): Y = empty((rows, h), X.dtype), RSTD = empty(rows, fp32) (llama / gemma
  casting modes); saves X itself (no fp32 copy, unlike transformers' RMSNorm, which upcasts and saves the copy),
  W and RSTD. Backward: dX (in place into dY by default, in_place=True) and the weight gradient when trained.
- LigerSiLUMulFunction / LigerGELUMulFunction (ops/swiglu.py, geglu.py): @ensure_contiguous copies a and b when
  they are views (Phi-3's chunked gate_up output), c = empty_like(a); saves a and b (the gate and up projections),
  not act(gate), which transformers' MLP keeps. Backward (swiglu_backward, geglu_backward) has its kernel store da
  and db into a and b and returns those: no new tensor beyond a contiguous dc.
- RoPE (ops/rope.py) rotates q and k in place and saves only cos and sin: the tensors attention saves are the same
  size either way, so the trace leaves transformers' rotary code in place (a few transient temporaries differ).
With real CPU tensors the values come from untracked reference computations.
"""
from __future__ import annotations

from memplan.errors import MemplanError
from memplan.trace.kernels import _is_meta, _untracked
from memplan.library_facts import LIGER_TYPES


def _models():
    import torch

    class RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps, offset):
            shape = x.shape
            x2 = x.contiguous().view(-1, shape[-1])
            y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
            rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            if not _is_meta(x):
                with _untracked(), torch.no_grad():
                    xf = x2.float()
                    r = torch.rsqrt(xf.pow(2).mean(-1) + eps)
                    rstd.copy_(r)
                    y.copy_((xf * r[:, None] * (offset + weight.float())).to(x.dtype))
            ctx.save_for_backward(x2, weight, rstd)
            ctx.eps, ctx.offset = eps, offset
            return y.view(shape)

        @staticmethod
        def backward(ctx, dy):
            x2, weight, rstd = ctx.saved_tensors
            dy2 = dy.contiguous().view(x2.shape)
            dx = torch.empty_like(dy2)  # in_place=True writes into dY; a fresh buffer when dY is someone's view
            dw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
            if not _is_meta(x2):
                with _untracked(), torch.enable_grad():
                    xx = x2.detach().float().requires_grad_(True)
                    out = xx * torch.rsqrt(xx.pow(2).mean(-1, keepdim=True) + ctx.eps) * (ctx.offset + weight.float())
                    (g,) = torch.autograd.grad(out, xx, dy2.float())
                with _untracked(), torch.no_grad():
                    dx.copy_(g)
            return dx.view(dy.shape), dw, None, None

    class GatedMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, gelu):
            a, b = a.contiguous(), b.contiguous()  # @ensure_contiguous: Phi-3's chunked gate / up are copied
            c = torch.empty_like(a)
            if not _is_meta(a):
                with _untracked(), torch.no_grad():
                    act = torch.nn.functional.gelu(a, approximate="tanh") if gelu else torch.nn.functional.silu(a)
                    c.copy_(act * b)
            ctx.save_for_backward(a, b)
            ctx.gelu = gelu
            return c

        @staticmethod
        def backward(ctx, dc):
            a, b = ctx.saved_tensors
            dc = dc.contiguous()
            if not _is_meta(a):
                with _untracked(), torch.enable_grad():
                    aa, bb = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
                    f = torch.nn.functional.gelu(aa, approximate="tanh") if ctx.gelu else torch.nn.functional.silu(aa)
                    ga, gb = torch.autograd.grad(f * bb, (aa, bb), dc)
                with _untracked(), torch.no_grad():
                    a.copy_(ga), b.copy_(gb)
            return a, b, None  # swiglu_backward / geglu_backward store da and db into a and b: nothing new

    return RMSNorm, GatedMul


def apply_liger_models(model, model_type: str) -> int:
    """Swap every RMSNorm's and gated MLP's forward for the models above; returns how many modules changed."""
    if model_type not in LIGER_TYPES:
        raise MemplanError(f"--liger on: liger-kernel has no RMSNorm/SwiGLU kernels for {model_type} "
                           f"(it patches {', '.join(LIGER_TYPES)})")
    RMSNorm, GatedMul = _models()
    gemma = model_type in ("gemma", "gemma2")
    changed = 0
    for name, m in model.named_modules():
        cls = type(m).__name__
        if cls.endswith("RMSNorm") and hasattr(m, "weight"):
            eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
            m.forward = (lambda mod, e: lambda x: RMSNorm.apply(x, mod.weight, e, 1.0 if gemma else 0.0))(m, eps)
            changed += 1
        elif cls.endswith("MLP") and hasattr(m, "down_proj") and (hasattr(m, "gate_proj") or hasattr(m, "gate_up_proj")):
            def forward(x, mod=m):
                if hasattr(mod, "gate_up_proj"):  # Phi-3: LigerPhi3SwiGLUMLP chunks the fused output (locals)
                    gate, up = mod.gate_up_proj(x).chunk(2, dim=-1)
                    return mod.down_proj(GatedMul.apply(gate, up, gemma))
                # LigerSwiGLUMLP.forward is one expression (liger_kernel/transformers/swiglu.py): gate_proj's and
                # up_proj's outputs are no locals while down_proj runs, only GatedMul's saved tensors
                return mod.down_proj(GatedMul.apply(mod.gate_proj(x), mod.up_proj(x), gemma))
            m.forward = forward
            changed += 1
    return changed
