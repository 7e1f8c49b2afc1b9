"""What the CUDA kernels allocate, modelled so that the meta/CPU step has the GPU's memory signature.

Each function here patches or replaces one kernel for the duration of a trace (the list is in runner.py's
docstring and docs/trace.md): fused SDPA (FlashAttention-2 / memory-efficient), the fused dropout mask,
bitsandbytes' CUDA gemm_4bit path, transformers' grouped_mm for MoE experts, and the Params4bit deepcopy that DoRA
needs on meta. With real CPU tensors the values come from untracked reference computations.
"""
from __future__ import annotations

import contextlib
import math

from memplan.spec import ModelSpec, TrainSpec


def _is_meta(t) -> bool:
    return t.device.type == "meta"


@contextlib.contextmanager
def _untracked():
    """Run real computations that a fused GPU kernel does in registers / its own workspace, unseen (by the tracker
    and by any saved-tensor hooks, e.g. activation offloading's)."""
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        yield


def _math_attention(q, k, v, attn_mask, scale, causal):
    import torch

    sdpa = getattr(torch.nn.functional.scaled_dot_product_attention, "original", None) or \
        torch.nn.functional.scaled_dot_product_attention

    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.float()
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return sdpa(
        q.float(), k.float(), v.float(), attn_mask=attn_mask, is_causal=causal, scale=scale).to(q.dtype)


def _make_fused_attention():
    import torch

    def r(x, m):
        return (x + m - 1) // m * m

    class FusedAttention(torch.autograd.Function):
        """FlashAttention-2's memory signature (flash_api.cpp mha_fwd / mha_bwd, as in PyTorch's flash SDPA)."""

        @staticmethod
        def forward(ctx, q, k, v, bias, scale, causal):
            b, a, s, d = q.shape
            # the output has v's head size: multi-head latent attention (DeepSeek-V2) has v 128 wide, q/k 192
            out = torch.empty((b, s, a, v.shape[-1]), dtype=q.dtype, device=q.device).transpose(1, 2)
            lse = torch.empty((b, a, s), dtype=torch.float32, device=q.device)
            if not _is_meta(q):
                with _untracked(), torch.no_grad():
                    out.copy_(_math_attention(q, k, v, bias, scale, causal))
            # the kernel keeps its (additive) mask for the backward; save_for_backward lets checkpointing drop it
            ctx.save_for_backward(q, k, v, out, lse, bias)
            ctx.scale, ctx.causal = scale, causal
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse, bias = ctx.saved_tensors
            b, a, s, d = q.shape
            kv = k.shape[1]
            dq = torch.empty((b, s, a, d), dtype=q.dtype, device=q.device).transpose(1, 2)
            dvd = v.shape[-1]
            dk = torch.empty((b, s, kv, d), dtype=k.dtype, device=k.device).transpose(1, 2)
            dv = torch.empty((b, s, kv, dvd), dtype=v.dtype, device=v.device).transpose(1, 2)
            d_r = r(d, 32) if d <= 192 else 256
            dq_accum = torch.empty((b, r(s, 128), a, d_r), dtype=torch.float32, device=q.device)
            softmax_d = torch.empty((b, a, r(s, 128)), dtype=torch.float32, device=q.device)
            expanded = None
            if kv != a:  # GQA: the kernel writes per-query-head dk/dv, then sums them per kv head
                expanded = (torch.empty((b, s, a, d), dtype=k.dtype, device=k.device),
                            torch.empty((b, s, a, dvd), dtype=v.dtype, device=v.device))
            if not _is_meta(q):
                with _untracked(), torch.enable_grad():
                    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
                    o = _math_attention(qq, kk, vv, bias, ctx.scale, ctx.causal)
                    gq, gk, gv = torch.autograd.grad(o, (qq, kk, vv), dout)
                with _untracked(), torch.no_grad():
                    dq.copy_(gq), dk.copy_(gk), dv.copy_(gv)
            del dq_accum, softmax_d, expanded
            return dq, dk, dv, None, None, None

    def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):
        if key.shape[1] != query.shape[1] and not enable_gqa:
            # K/V with fewer heads than Q (Falcon-7B's multi-query: 1 head) and no enable_gqa: torch 2.13's
            # check_batch_size_and_num_heads_dense (sdp_utils_cpp.h) rejects flash, memory-efficient and cuDNN,
            # so on CUDA SDPA falls back to its math kernel (_scaled_dot_product_attention_math, composite, the
            # same ops on every device): q/k/v upcast to fp32, b·a·s² fp32 scores and softmax kept for backward.
            # The original SDPA takes that path on meta and CPU too, so it runs as is.
            fused_attention.math_fallbacks.add((tuple(query.shape[1:2]), tuple(key.shape[1:2])))
            return fused_attention.original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                            is_causal=is_causal, scale=scale)
        if scale is None:
            scale = 1.0 / math.sqrt(query.shape[-1])
        bias = None
        if attn_mask is not None:
            # With a mask flash attention is out (check_for_attn_mask) and CUDA runs the memory-efficient kernel.
            # SDPA first turns a boolean mask into an additive one in the query dtype (convert_boolean_attn_mask:
            # where(mask.logical_not(), -inf, 0)) and pads its last dim to a multiple of 16 (preprocess_mask);
            # the kernel keeps that bias for its backward.
            fused_attention.masked += 1
            if attn_mask.dtype == torch.bool:
                bias = torch.where(attn_mask.logical_not(), float("-inf"),
                                   torch.scalar_tensor(0.0, dtype=query.dtype, device=query.device))
            else:
                bias = attn_mask
            kv = bias.shape[-1]
            if kv % 16:
                padded = torch.empty((*bias.shape[:-1], r(kv, 16)), dtype=bias.dtype, device=bias.device)
                padded[..., :kv].copy_(bias)
                bias = padded[..., :kv]
        return FusedAttention.apply(query, key, value, bias, scale, bool(is_causal))

    fused_attention.original = torch.nn.functional.scaled_dot_product_attention
    fused_attention.apply_kernel = FusedAttention.apply
    fused_attention.math_fallbacks = set()
    fused_attention.masked = 0
    return fused_attention


class _MetaAutocastTorch:
    """torch, as seen by transformers' flash_attention integration, but for is_autocast_enabled("meta") (torch
    has no autocast for meta and raises): False, as for a step without autocast on the GPU."""

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)

    @staticmethod
    def is_autocast_enabled(device_type=None):
        import torch

        if device_type == "meta":
            return False
        return torch.is_autocast_enabled(device_type) if device_type else torch.is_autocast_enabled()


def _make_flash_attn(fused_apply):
    """flash-attn 2's Python entry points (flash_attn_interface.py flash_attn_func / flash_attn_varlen_func), with
    their memory signature, for transformers' flash_attention_2 integration. flash-attn does not build on a
    CPU-only machine, so the trace models it from its source: FlashAttnFunc.forward pads a head_dim that is not a
    multiple of 8 (a copy of q, k and v), and mha_fwd (csrc/flash_attn/flash_api.cpp) allocates the output
    (b, s, a, d), the fp32 softmax_lse (b, a, s) and a 2 x int64 rng_state, all saved with q, k, v for the
    backward; mha_bwd's dq/dk/dv, fp32 dq_accum, softmax_d and expanded GQA dk/dv are FusedAttention's. GQA is
    native (k/v keep their kv heads); the causal window and soft-capping run inside the kernel (no mask, no
    b·a·s² tensor). With real tensors the values come from an untracked math attention that ignores the window
    and the soft-cap: the bytes, not the numbers, are what the trace is for."""
    import torch

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        d = q.shape[-1]
        if d % 8:
            pad = 8 - d % 8
            q, k, v = (torch.nn.functional.pad(t, [0, pad]) for t in (q, k, v))
        if softmax_scale is None:
            softmax_scale = d ** -0.5
        flash_attn_func.calls += 1
        out = fused_apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, softmax_scale,
                          bool(causal)).transpose(1, 2)
        return out[..., :d] if d % 8 else out

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        raise RuntimeError("padded or packed batches (flash_attn_varlen_func) are not traced: memplan's batch is "
                           "unpadded, one sequence per row")

    flash_attn_func.calls = 0
    return flash_attn_func, flash_attn_varlen_func


def _native_dropout(original):
    import torch

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p <= 0.0 or p >= 1.0 or inplace:
            return original(input, p, training, inplace)
        return torch.native_dropout(input, p, True)[0]

    return dropout


def gemm_4bit_cuda_semantics():
    """A dispatch mode that runs bitsandbytes::gemm_4bit as bitsandbytes' CUDA backend does for training batches."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    gemm = torch.ops.bitsandbytes.gemm_4bit.default

    class Gemm4bitAsCuda(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not gemm:
                return func(*args, **kwargs)
            names = ("A", "B", "shapeB", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit",
                     "absmax_code", "absmax_offset")
            a = dict(zip(names, args))
            a.update(kwargs)
            absmax = a["absmax"]
            if a.get("absmax_8bit") is not None:
                absmax_dq = torch.ops.bitsandbytes.dequantize_blockwise.default(
                    a["absmax_8bit"], absmax, a["absmax_code"], 256, torch.float32)
                absmax = absmax_dq + a["absmax_offset"]
                del absmax_dq
            w = torch.ops.bitsandbytes.dequantize_4bit.default(
                a["B"], absmax, a["blocksize"], a["quant_type"], a["shapeB"], a["A"].dtype)
            return torch.nn.functional.linear(a["A"], w, a.get("bias"))

    return Gemm4bitAsCuda()


def _make_grouped_mm():
    """transformers' MoE grouped matmul with grouped_mm's memory signature, for any dtype and on meta.

    torch's grouped_mm kernels take bf16 only; prepare_model_for_kbit_training leaves the experts in fp32, and
    transformers' loop fallback allocates a full-size weight gradient even for frozen experts. The trace
    allocates what the fused grouped GEMM does: the output; in backward the input gradient, and the weight
    gradient only if the experts are trained. With real tensors the values come from an untracked matmul loop.
    """
    import torch

    def compute(x, w, offs):
        out = torch.zeros(x.size(0), w.size(2), dtype=x.dtype)
        start = 0
        for i, end in enumerate(offs.tolist()):
            if end > start:
                out[start:end] = x[start:end] @ w[i].to(x.dtype)
            start = end
        return out

    class GroupedMM(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, offs):
            out = torch.empty((x.size(0), w.size(2)), dtype=x.dtype, device=x.device)
            if not _is_meta(x):
                with _untracked(), torch.no_grad():
                    out.copy_(compute(x, w, offs))
            ctx.save_for_backward(x if w.requires_grad else None, w, offs)
            return out

        @staticmethod
        def backward(ctx, grad):
            x, w, offs = ctx.saved_tensors
            gx = torch.empty((grad.size(0), w.size(1)), dtype=grad.dtype, device=grad.device)
            gw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
            if not _is_meta(grad):
                with _untracked(), torch.no_grad():
                    gx.copy_(compute(grad, w.transpose(1, 2), offs))
            return gx, gw, None

    def grouped_mm(input, weight, offs):
        return GroupedMM.apply(input.to(weight.dtype), weight, offs)

    return grouped_mm


# transformers 4.x sparse-MoE blocks (a Python loop over nn.Linear experts), by module and class name.
_TF4_MOE_BLOCKS = (("mixtral", "MixtralSparseMoeBlock"), ("qwen2_moe", "Qwen2MoeSparseMoeBlock"),
                   ("qwen3_moe", "Qwen3MoeSparseMoeBlock"))


def _balanced_moe_forward(original):
    """transformers 4.57.6's sparse-MoE forward (MixtralSparseMoeBlock.forward and the Qwen MoE copies), op for op,
    with its data-dependent routing made data-free on meta.

    The original loops over `expert_mask.sum(...).nonzero()` and indexes the expert ModuleList with a tensor,
    then gathers each expert's tokens with `torch.where(expert_mask[e])`: all three need values, which meta tensors
    do not have. On meta every expert is hit and gets an equal share of the b*s*top_k token-slots (balanced
    routing, as the estimate assumes; the memory of each slot does not depend on which expert serves it). With
    real tensors the original runs unchanged."""
    import torch
    import torch.nn.functional as F

    def forward(self, hidden_states):
        if not _is_meta(hidden_states):
            return original(self, hidden_states)
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):  # Mixtral always normalizes
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
                                          device=hidden_states.device)
        num_experts = len(self.experts)
        expert_mask = F.one_hot(selected_experts, num_classes=num_experts).permute(2, 1, 0)
        slots = batch_size * sequence_length * self.top_k
        for expert_idx in range(num_experts):
            n = slots // num_experts + (1 if expert_idx < slots % num_experts else 0)
            idx = torch.empty(n, dtype=torch.long, device=hidden_states.device)  # torch.where's two outputs
            top_x = torch.empty(n, dtype=torch.long, device=hidden_states.device)
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        del expert_mask
        if getattr(self, "shared_expert", None) is not None:  # Qwen2-MoE
            shared = self.shared_expert(hidden_states)
            shared = F.sigmoid(self.shared_expert_gate(hidden_states)) * shared
            final_hidden_states = final_hidden_states + shared
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits

    return forward


def _meta_as_cpu_autocast(autocast):
    """torch.autocast that treats device_type "meta" as "cpu" (only ever used with enabled=False there)."""

    class MetaAsCpu(autocast):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    return MetaAsCpu


def _tf4_moe_classes() -> list:
    import importlib

    out = []
    for module, name in _TF4_MOE_BLOCKS:
        try:
            cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name, None)
        except ImportError:  # pragma: no cover
            cls = None
        if cls is not None and hasattr(cls, "forward") and "experts" in cls.__init__.__code__.co_names:
            out.append(cls)
    return out


@contextlib.contextmanager
def patched(train: TrainSpec):
    import torch
    import torch.nn.functional as F
    import transformers.masking_utils as mu

    from memplan.stack import installed_major

    tf4 = installed_major() == 4
    saved = (F.scaled_dot_product_attention, F.dropout, mu.find_packed_sequence_indices)
    saved_fa = None
    moe_classes = _tf4_moe_classes() if tf4 else []
    moe_forwards = [cls.forward for cls in moe_classes]
    saved_autocast = torch.autocast
    try:
        import transformers.integrations.moe as moe
    except ImportError:  # pragma: no cover
        moe = None
    saved_gmm = getattr(moe, "_grouped_mm", None)
    fused = None
    try:
        if saved_gmm is not None:
            moe._grouped_mm = _make_grouped_mm()
        if train.attention == "sdpa":
            fused = F.scaled_dot_product_attention = _make_fused_attention()
        elif train.attention == "flash_attention_2":
            import transformers.integrations.flash_attention as fa_int
            import transformers.modeling_flash_attention_utils as mfu

            saved_fa = (mfu, fa_int, mfu.lazy_import_flash_attention, mfu._is_packed_sequence, fa_int.torch)
            flash_fn, varlen_fn = _make_flash_attn(_make_fused_attention().apply_kernel)
            loaded = ((flash_fn, varlen_fn, None, mfu._pad_input, mfu._unpad_input),
                      (mfu._lazy_define_process_function(varlen_fn), None))
            mfu.lazy_import_flash_attention = lambda *a, **k: loaded
            # data-dependent (reads position_ids): memplan's batch is one unpacked sequence per row
            mfu._is_packed_sequence = lambda *a, **k: False
            fa_int.torch = _MetaAutocastTorch()  # get_target_dtype asks torch.is_autocast_enabled("meta")
            fused = flash_fn
        F.dropout = _native_dropout(saved[1])
        if not tf4:  # 5.x calls .all() on it (data-dependent); 4.x returns the tensor as is and runs on meta
            mu.find_packed_sequence_indices = lambda *a, **k: None
        for cls, original in zip(moe_classes, moe_forwards):
            cls.forward = _balanced_moe_forward(original)
        if tf4:  # 4.x rotary embeddings open torch.autocast(device_type=x.device.type): "meta" is no autocast device
            torch.autocast = _meta_as_cpu_autocast(saved_autocast)
        yield fused
    finally:
        F.scaled_dot_product_attention, F.dropout, mu.find_packed_sequence_indices = saved
        if saved_fa:
            mfu, fa_int = saved_fa[:2]
            mfu.lazy_import_flash_attention, mfu._is_packed_sequence, fa_int.torch = saved_fa[2:]
        for cls, original in zip(moe_classes, moe_forwards):
            cls.forward = original
        torch.autocast = saved_autocast
        if saved_gmm is not None:
            moe._grouped_mm = saved_gmm


@contextlib.contextmanager
def meta_params4bit_deepcopy(enabled: bool):
    """Let bitsandbytes' Params4bit.__deepcopy__ copy a meta weight.

    PEFT's DoRA (peft/tuners/lora/dora.py DoraLinearLayer.update_layer) deep-copies a Linear4bit before
    dequantizing it to initialize the magnitude vector. Params4bit.__deepcopy__ starts from a bare
    `Params4bit.__new__` (an empty CPU tensor) and then sets `.data` to the copied weight: CPU -> CUDA is allowed
    (that is the GPU run), CPU -> meta is not ("incompatible tensor type"). The patch starts the copy from an empty
    tensor on the weight's own device and then runs bitsandbytes' own __deepcopy__ steps unchanged. Setup only: the
    copy is dropped before the tracker starts, as on the GPU where it is freed before training.
    """
    if not enabled:
        yield
        return
    import copy

    import bitsandbytes as bnb
    import torch

    cls = bnb.nn.Params4bit
    original = cls.__deepcopy__

    def deepcopy(self, memo):
        if self.device.type != "meta":
            return original(self, memo)
        new = cls.__new__(type(self), data=torch.empty(0, dtype=self.dtype, device=self.device))
        state = self.__getstate__()
        new.__setstate__(state)
        new.quant_state = copy.deepcopy(state["quant_state"])
        new.data = copy.deepcopy(state["data"])
        return new

    cls.__deepcopy__ = deepcopy
    try:
        yield
    finally:
        cls.__deepcopy__ = original


def attention_notes(model: ModelSpec, fused) -> list[str]:
    if fused is None:
        return []
    if hasattr(fused, "calls"):  # flash_attention_2
        return [f"flash_attention_2: flash-attn does not install on this machine; its kernel's allocations are "
                f"modelled from its source (flash_attn_interface.py, flash_api.cpp mha_fwd/mha_bwd) and run "
                f"{fused.calls} time(s) under transformers' real flash_attention_2 integration"]
    notes = []
    for (qh,), (kh,) in sorted(fused.math_fallbacks):
        notes.append(
            f"{model.name}: transformers calls SDPA with {kh} key/value head(s) for {qh} query heads and no "
            "enable_gqa (multi-query); PyTorch's flash, memory-efficient and cuDNN kernels reject that, so on CUDA "
            "SDPA falls back to its math kernel: the trace runs it too (fp32 b·a·s² scores and softmax per layer)")
    if fused.masked and not fused.math_fallbacks:
        notes.append(
            f"{model.name}: transformers passes an explicit attention mask to SDPA, so CUDA runs the memory-efficient "
            "kernel (flash takes no mask); the trace keeps the additive b·s² mask it saves for backward and "
            "otherwise counts flash attention's O(s) buffers")
    return notes


# LLM.int8's outlier columns are data-dependent: on meta the trace states their number (library_facts.py)
from memplan.library_facts import INT8_OUTLIER_COLUMNS  # noqa: E402


def int8_outliers_mode():
    """A dispatch mode that answers bitsandbytes::int8_vectorwise_quant on meta with INT8_OUTLIER_COLUMNS outlier
    columns (its fake kernel asks for a dynamic size, which meta tensors cannot give); real tensors run as is."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    op = torch.ops.bitsandbytes.int8_vectorwise_quant.default
    mixed = torch.ops.bitsandbytes.int8_mixed_scaled_mm.default

    def mixed_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
        """bitsandbytes backends/default/ops.py int8_mixed_scaled_mm (the kernel CUDA runs too), step by step."""
        subB = None
        if outlier_cols is not None and outlier_cols.numel():
            subA = A[:, outlier_cols].contiguous()
            subB = torch.ops.bitsandbytes.int8_vectorwise_dequant.default(CB[:, outlier_cols].contiguous(), SCB)
            subB = subB.to(A.dtype).t()
        else:
            subA = torch.empty(0, device=A.device, dtype=A.dtype)
        output = torch.ops.bitsandbytes.int8_scaled_mm.default(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
        if subB is not None:
            output = output.addmm(subA, subB)
        return output, subA

    class Int8Outliers(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is mixed and _is_meta(args[0]):
                return mixed_mm(*args, **kwargs)
            if func is not op or not _is_meta(args[0]):
                return func(*args, **kwargs)
            a = args[0]
            threshold = args[1] if len(args) > 1 else kwargs.get("threshold", 0.0)
            out_row = torch.empty(a.shape, device=a.device, dtype=torch.int8)
            row_stats = torch.empty(a.numel() // a.shape[-1], device=a.device, dtype=torch.float32)
            if not threshold:
                return out_row, row_stats, None
            cols = min(INT8_OUTLIER_COLUMNS, a.shape[-1])
            return out_row, row_stats, torch.empty(cols, device=a.device, dtype=torch.int64)

    return Int8Outliers()


@contextlib.contextmanager
def meta_adafactor_scalars():
    """transformers' Adafactor._get_lr takes max(eps2, state["RMS"]) in Python: with a meta RMS that needs
    .item(). The learning rate is a Python float that allocates nothing, so on meta the RMS reads as 1.0; real
    tensors run the original."""
    from transformers.optimization import Adafactor

    original = Adafactor._get_lr

    def get_lr(param_group, param_state):
        rms = param_state.get("RMS")
        if hasattr(rms, "device") and _is_meta(rms):
            param_state = {**param_state, "RMS": 1.0}
        return original(param_group, param_state)

    Adafactor._get_lr = staticmethod(get_lr)
    try:
        yield
    finally:
        Adafactor._get_lr = staticmethod(original)
