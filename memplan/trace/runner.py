"""Run one real training step on meta tensors (or, for small models, real CPU tensors) and count live bytes.

The step is the user's recipe (memplan/recipe.py) on the real transformers / PEFT / bitsandbytes code:

1. the model is built from its config.json on the meta device (real=True: on the CPU with random weights);
2. bits 4/8: transformers' own replace_with_bnb_linear swaps every `type(m) is nn.Linear` but the output layer
   (transformers' get_keys_to_not_convert) for bitsandbytes Linear4bit / Linear8bitLt, whose weights are the
   output of bitsandbytes' quantize_4bit / int8_vectorwise_quant run on the (meta) weight; the model is marked
   is_loaded_in_4bit / is_loaded_in_8bit as from_pretrained does, so PEFT wraps those layers with its
   bitsandbytes LoRA layers and prepare_model_for_kbit_training upcasts what from_pretrained would leave;
3. recipe.apply_recipe (upcast, HF gradient checkpointing, LoRA), model.train(), recipe.make_optimizer;
4. two recipe.train_step calls under the tracker; the second one is the steady state (optimizer states exist).

What the trace changes so that the step models a CUDA GPU and runs on meta (each listed in docs/trace.md):
- attention (--attention sdpa): torch.nn.functional.scaled_dot_product_attention is routed to `fused_attention`,
  which allocates what PyTorch's flash-attention kernel allocates on CUDA (FlashAttention-2, flash_api.cpp):
  forward output + fp32 log-sum-exp, backward dq/dk/dv (+ the fp32 dq accumulator, softmax_d, and expanded dk/dv
  for GQA, freed when the kernel returns). No b·a·s² scores. --attention eager runs transformers' eager code.
  K/V with fewer heads than Q and no enable_gqa (Falcon-7B's multi-query) is refused by every fused kernel in
  torch 2.13, so CUDA runs SDPA's math kernel: the trace runs it too (b·a·s² fp32 scores) and notes it. An explicit
  mask (Falcon) means CUDA's memory-efficient kernel: the additive b·s² bias SDPA makes is kept for the backward.
- dropout: F.dropout in training is run as aten.native_dropout (the fused CUDA kernel: a 1-byte bool mask) instead
  of the CPU/meta decomposition (a mask in the input's dtype).
- bitsandbytes gemm_4bit: on meta its fake kernel allocates only the output; the trace runs what bitsandbytes'
  CUDA backend runs for training-sized batches (> 1536 tokens, and most large weights below that): absmax
  dequantization, the dequantized weight in the compute dtype, then F.linear (backends/cuda/ops.py,
  _dequant_linear_fallback).
- transformers.masking_utils.find_packed_sequence_indices (data-dependent) returns None: the batch is one
  unpadded, unpacked sequence per row, as the GPU run would conclude from position_ids = arange.
- MoE: transformers 5 routes with its default "grouped_mm" experts: its memory depends only on
  tokens × top-k, not on which experts are hit. On meta the router's top-k indices are whatever the meta kernel
  says (no values), so routing is data-free; with real tensors the routing is the random model's, and the bytes
  are the same.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
import warnings
from dataclasses import dataclass, field

from memplan.errors import MemplanError
from memplan.spec import ModelSpec, TrainSpec
from memplan.trace.tracker import CATEGORIES, PHASES, LiveBytesTracker

TOP_TENSORS = 15


@dataclass
class TraceResult:
    model: str
    params_total: int
    params_trainable: int
    config: dict
    components: dict
    peak_bytes: int
    peak_phase: str
    phases: dict
    top_tensors: list
    timeline: list = field(repr=False, default_factory=list)
    notes: list = field(default_factory=list)
    real: bool = False
    wall_s: float = 0.0
    steps: int = 2
    phase_components: dict = field(default_factory=dict)

    def to_dict(self, timeline_csv: str | None = None) -> dict:
        return {
            "model": self.model,
            "params": {"total": self.params_total, "trainable": self.params_trainable},
            "config": self.config,
            "components": dict(self.components),
            "peak_bytes": self.peak_bytes,
            "device_total_bytes": None,
            "peak_phase": self.peak_phase,
            "phases": dict(self.phases),
            "top_tensors": self.top_tensors,
            "timeline_csv": timeline_csv,
            "notes": list(self.notes),
            "device": "cpu" if self.real else "meta",
            "wall_s": round(self.wall_s, 3),
        }


# ------------------------------------------------------------------------------------------------ patches
def _is_meta(t) -> bool:
    return t.device.type == "meta"


@contextlib.contextmanager
def _untracked():
    """Run real computations that a fused GPU kernel does in registers / its own workspace, unseen."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
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
            out = torch.empty((b, s, a, d), dtype=q.dtype, device=q.device).transpose(1, 2)
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
            dk = torch.empty((b, s, kv, d), dtype=k.dtype, device=k.device).transpose(1, 2)
            dv = torch.empty((b, s, kv, d), dtype=v.dtype, device=v.device).transpose(1, 2)
            d_r = r(d, 32) if d <= 192 else 256
            dq_accum = torch.empty((b, r(s, 128), a, d_r), dtype=torch.float32, device=q.device)
            softmax_d = torch.empty((b, a, r(s, 128)), dtype=torch.float32, device=q.device)
            expanded = None
            if kv != a:  # GQA: the kernel writes per-query-head dk/dv, then sums them per kv head
                expanded = (torch.empty((b, s, a, d), dtype=k.dtype, device=k.device),
                            torch.empty((b, s, a, d), dtype=v.dtype, device=v.device))
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
    fused_attention.math_fallbacks = set()
    fused_attention.masked = 0
    return fused_attention


def _native_dropout(original):
    import torch

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p <= 0.0 or p >= 1.0 or inplace:
            return original(input, p, training, inplace)
        return torch.native_dropout(input, p, True)[0]

    return dropout


def _gemm_4bit_cuda_semantics():
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


@contextlib.contextmanager
def _patched(train: TrainSpec):
    import torch
    import torch.nn.functional as F
    import transformers.masking_utils as mu

    saved = (F.scaled_dot_product_attention, F.dropout, mu.find_packed_sequence_indices)
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
        F.dropout = _native_dropout(saved[1])
        mu.find_packed_sequence_indices = lambda *a, **k: None
        yield fused
    finally:
        F.scaled_dot_product_attention, F.dropout, mu.find_packed_sequence_indices = saved
        if saved_gmm is not None:
            moe._grouped_mm = saved_gmm
        del torch


@contextlib.contextmanager
def _meta_params4bit_deepcopy(enabled: bool):
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


# --------------------------------------------------------------------------------------------- the model
_BNB_READY = False


def _bnb_warmup():
    """Build bitsandbytes' quantization maps on the CPU once, outside meta (DESIGN.md, known facts)."""
    global _BNB_READY
    if _BNB_READY:
        return
    import bitsandbytes.functional as bf
    import torch

    for qt in ("nf4", "fp4"):
        bf.quantize_4bit(torch.zeros(128, dtype=torch.float32), blocksize=64, compress_statistics=True, quant_type=qt)
    _BNB_READY = True


def hf_config(model: ModelSpec, train: TrainSpec):
    from transformers import AutoConfig

    cfg = {k: v for k, v in model.hf_config.items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(model.model_type, **cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise MemplanError(f"{model.name}: transformers cannot build a {model.model_type} config: {e}") from None
    config.use_cache = False
    return config


def build_model(model: ModelSpec, train: TrainSpec, *, real: bool, notes: list):
    """The transformers model for `model`, quantized as from_pretrained(quantization_config=...) would."""
    import torch
    from transformers import AutoModelForCausalLM

    from memplan import recipe

    config = hf_config(model, train)
    attn = train.attention
    if attn == "sdpa" and getattr(config, "attn_logit_softcapping", None):
        attn = "eager"
        notes.append(f"{model.model_type} caps attention logits (attn_logit_softcapping): transformers runs it "
                     "only with eager attention, so the trace uses eager")
    dtype = recipe.torch_dtype(train)
    device = "cpu" if real else "meta"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device(device):
            if real:
                torch.manual_seed(0)
            hf = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    hf.config.use_cache = False
    if train.quantized:
        _quantize(hf, train, real=real)
    return hf


def _quantize(hf, train: TrainSpec, *, real: bool) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    import torch
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    from memplan import recipe

    _bnb_warmup()
    qconfig = recipe.bnb_config(train)
    keep = get_keys_to_not_convert(hf)
    originals = {name: m for name, m in hf.named_modules() if type(m) is torch.nn.Linear}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = replace_with_bnb_linear(hf, modules_to_not_convert=keep, quantization_config=qconfig)
    dtype = recipe.torch_dtype(train)
    for name, module in hf.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            old = originals[name]
            w = old.weight.data.to(dtype)
            bias = old.bias
            if isinstance(module, bnb.nn.Linear4bit):
                packed, qs = bf.quantize_4bit(w, blocksize=64, compress_statistics=train.double_quant,
                                              quant_type=train.quant_type, quant_storage=torch.uint8)
                module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=64,
                                                  compress_statistics=train.double_quant,
                                                  quant_type=train.quant_type, quant_storage=torch.uint8,
                                                  module=module, bnb_quantized=True)
            else:
                cb, scb, _ = bf.int8_vectorwise_quant(w.to(torch.float16))
                param = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
                param.CB, param.SCB = cb, scb
                module.weight = param
            module.bias = None if bias is None else torch.nn.Parameter(bias.data.to(dtype), requires_grad=False)
            del w
    originals.clear()
    if train.bits == 4:
        hf.is_loaded_in_4bit = True
    else:
        hf.is_loaded_in_8bit = True
    hf.is_quantized = True
    hf.quantization_method = "bitsandbytes"
    hf.config.quantization_config = qconfig


# ------------------------------------------------------------------------------------------ attribution
def _register_model(tracker: LiveBytesTracker, model) -> None:
    import bitsandbytes as bnb

    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        module = name.rsplit(".", 1)[0]
        if isinstance(p, bnb.nn.Params4bit):
            tracker.register(p, "weights_quantized", module)
            qs = p.quant_state
            if qs is not None:
                for t in _quant_state_tensors(qs):
                    tracker.register(t, "quant_state", module)
        elif isinstance(p, bnb.nn.Int8Params):
            tracker.register(p, "weights_quantized", module)
            for t in (getattr(p, "SCB", None),):
                if t is not None:
                    tracker.register(t, "quant_state", module)
        elif p.requires_grad and ("lora_" in name or "modules_to_save" in name):
            tracker.register(p, "lora", module)
        else:
            tracker.register(p, "weights_unquantized", module)
    for name, b in model.named_buffers():
        tracker.register(b, "weights_unquantized", name.rsplit(".", 1)[0])


def _quant_state_tensors(qs):
    out = [qs.absmax, qs.code, getattr(qs, "offset", None)]
    s2 = getattr(qs, "state2", None)
    if s2 is not None:
        out += [s2.absmax, s2.code]
    return [t for t in out if t is not None and hasattr(t, "untyped_storage")]


class _Attribution:
    """Module names for allocations, and the logits/loss window, via global module hooks."""

    def __init__(self, tracker: LiveBytesTracker, model):
        import torch

        self.tracker = tracker
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.bwd_module = ""
        self.tail = False  # forward: after the output layer began; backward: until the logits' grad is ready
        self.head_ids = {id(m) for n, m in model.named_modules() if n.split(".")[-1] == "lm_head"}
        self.handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(self._pre),
            torch.nn.modules.module.register_module_forward_hook(self._post),
        ]
        tracker.classify = self._classify

    def _pre(self, module, args):
        name = self.names.get(id(module))
        if name is None:
            return
        self.stack.append(name)
        self.tracker.module = name
        if id(module) in self.head_ids and self.tracker.phase == "forward":
            self.tail = True

    def _post(self, module, args, output):
        name = self.names.get(id(module))
        if name is None:
            return
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        self.tracker.module = self.stack[-1] if self.stack else ""
        import torch

        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            if self.tracker.phase == "forward" and output.requires_grad:
                if id(module) in self.head_ids:
                    output.register_hook(self._logits_grad_ready)
                output.register_hook(lambda grad, name=name: self._backward_of(name))

    def _backward_of(self, name):
        self.bwd_module = name
        return None

    def _logits_grad_ready(self, grad):
        self.tail = False
        return None

    def _classify(self, tensor, rec):
        phase = self.tracker.phase
        if phase == "forward":
            if self.tail:
                rec.category = "logits_loss"
        elif phase == "backward":
            import torch

            if self.stack:  # checkpoint recomputation: the forward hooks name the module
                rec.module = self.stack[-1] + " (recompute)"
            else:
                node = torch._C._current_autograd_node()
                where = self.bwd_module or "loss"
                rec.module = f"{where} ({node.name()})" if node is not None else where
            if self.tail:
                rec.category = "logits_loss"

    def start_phase(self, phase: str) -> None:
        if phase == "backward":
            self.tail = True  # the loss and logits gradients come first
        elif phase == "forward":
            self.tail = False
        self.stack.clear()
        self.tracker.module = ""

    def close(self):
        for h in self.handles:
            h.remove()
        self.tracker.classify = None


def _finish_phase(tracker: LiveBytesTracker, phase: str, since: int, model, optimizer) -> None:
    """Label what a phase leaves alive: forward -> activations, backward -> gradients, optimizer -> states."""
    survivors = [r for r in tracker._live.values() if r.event >= since and r.phase == phase]
    if phase == "forward":
        for r in survivors:
            if r.category == "temporaries":
                r.category = "activations"
    elif phase == "backward":
        for p in model.parameters():
            if p.grad is not None:
                tracker.label(p.grad, "gradients")
    elif phase == "optimizer":
        for r in survivors:
            r.category = "optimizer_states"


# ------------------------------------------------------------------------------------------------- run
def run_trace(model: ModelSpec, train: TrainSpec, *, real: bool = False, steps: int = 2,
              budget_bytes: int | None = None, keep_timeline: bool = True) -> TraceResult:
    """Trace `steps` training steps of `model` with `train`; see the module docstring."""
    import torch

    from memplan import recipe

    if steps < 1:
        raise MemplanError("steps must be at least 1")
    t0 = time.perf_counter()
    notes: list[str] = []
    if train.optimizer.startswith("paged"):
        notes.append(f"{train.optimizer}: traced as its non-paged twin (bitsandbytes' paged buffers need CUDA "
                     "managed memory); same bytes, evictable to host memory on a GPU")
    if train.quantized and train.bits == 8 and real:
        notes.append("8-bit on real CPU tensors runs bitsandbytes' CPU matmul (MatMul8bitFp), not the CUDA one")
    torch_threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            hf = build_model(model, train, real=real, notes=notes)
        with _meta_params4bit_deepcopy(enabled=not real and train.dora and train.bits == 4):
            peft_model = recipe.apply_recipe(hf, model, train)
    except MemplanError:
        raise
    except Exception as e:
        raise MemplanError(f"cannot set up {model.name} for training ({e.__class__.__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from e
    params = recipe.trainable_parameters(peft_model)
    total = sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
                for n, p in _unique_named_params(peft_model) if "lora_" not in n and "modules_to_save" not in n)
    trainable = sum(p.numel() for p in params)
    optimizer = recipe.make_optimizer(params, train, paged=False)
    device = "cpu" if real else "meta"
    if real:
        torch.manual_seed(0)
        input_ids = torch.randint(0, model.vocab_size, (train.batch_size, train.seq_len), device=device)
    else:
        input_ids = torch.empty((train.batch_size, train.seq_len), dtype=torch.long, device=device)

    tracker = LiveBytesTracker(budget_bytes=budget_bytes, keep_timeline=keep_timeline)
    _register_model(tracker, peft_model)
    tracker.register(input_ids, "activations", "input_ids")
    tracker.phase_peaks["load"] = tracker.current
    attribution = _Attribution(tracker, peft_model)
    phase_marks: dict[str, int] = {}

    def on_phase(phase: str) -> None:
        prev = tracker.phase
        if prev in phase_marks:
            _finish_phase(tracker, prev, phase_marks[prev], peft_model, optimizer)
        tracker.phase = phase
        phase_marks[phase] = tracker.events
        attribution.start_phase(phase)

    gemm_mode = _gemm_4bit_cuda_semantics() if train.bits == 4 else contextlib.nullcontext()
    try:
        with _patched(train) as fused, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tracker, gemm_mode:
                for _ in range(steps):
                    recipe.train_step(peft_model, optimizer, input_ids, on_phase)
                    _finish_phase(tracker, "optimizer", phase_marks["optimizer"], peft_model, optimizer)
        notes.extend(_attention_notes(model, fused))
    except MemplanError:
        raise
    except Exception as e:
        from memplan.trace.tracker import TrackerOutOfMemory

        if isinstance(e, TrackerOutOfMemory):
            raise
        raise MemplanError(f"trace of {model.name} failed in {tracker.phase} ({tracker.module or 'no module'}): "
                           f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        attribution.close()
        torch.set_num_threads(torch_threads)

    records = tracker.peak_records()
    components = tracker.by_category(records)
    top = [r.to_dict() for r in records[:TOP_TENSORS]]
    for t in top:
        t["module"] = t["module"].replace("base_model.model.", "", 1)
    phases = {p: tracker.phase_peaks.get(p, 0) for p in PHASES}
    result = TraceResult(
        model=model.name, params_total=total, params_trainable=trainable, config=train.to_dict(),
        components={c: components.get(c, 0) for c in CATEGORIES}, peak_bytes=tracker.peak,
        peak_phase=tracker.peak_phase, phases=phases, top_tensors=top,
        timeline=list(tracker.timeline), notes=notes, real=real, steps=steps,
    )
    tracker.stop()
    del optimizer, peft_model, hf, params, tracker, attribution
    gc.collect()
    result.wall_s = time.perf_counter() - t0
    return result


def _attention_notes(model: ModelSpec, fused) -> list[str]:
    if fused is None:
        return []
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


def _unique_named_params(model):
    seen = set()
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield n, p
