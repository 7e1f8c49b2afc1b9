"""The user's fine-tuning recipe, as plain functions. Shared by the meta trace (memplan/trace/) and the real
profiler (memplan/profile/), so both measure the same code path as a QLoRA / LoRA training script:

    bnb_config(train)                      transformers.BitsAndBytesConfig for from_pretrained (None for 16/32-bit)
    torch_dtype(train)                     the dtype the base model is loaded in
    lora_targets(model_spec, train)        PEFT target_modules for a TrainSpec's target set
    lora_config(model_spec, train)         peft.LoraConfig
    apply_recipe(model, model_spec, train) prepare_model_for_kbit_training (TrainSpec.upcast), gradient
                                           checkpointing (HF, non-reentrant), LoRA via PEFT (or full fine-tuning),
                                           model.train(); returns the model to train
    make_optimizer(params, train, paged=True)  the optimizer (created empty: states appear at the first step())
    train_step(model, optimizer, input_ids, on_phase)  one step: forward with labels=input_ids, backward,
                                           optimizer.step(), zero_grad(set_to_none=True)

Choices that change memory, stated once here:
- adamw is torch.optim.AdamW(foreach=True): the multi-tensor implementation PyTorch picks by default on CUDA.
- adamw-8bit is bitsandbytes.optim.AdamW8bit (block-wise 8-bit states; tensors under 4096 elements keep 32-bit
  states, bitsandbytes' min_8bit_size). paged-adamw / paged-adamw-8bit are bitsandbytes' PagedAdamW /
  PagedAdamW8bit; with paged=False (the meta trace: bitsandbytes' paged buffers need CUDA managed memory) they are
  accounted as their non-paged equivalents AdamW(optim_bits=32) / AdamW8bit: the same bytes, which on a GPU live
  in managed memory the driver may evict to the host under pressure.
- sgd is torch.optim.SGD(momentum=0.9, foreach=True): one momentum buffer per trainable parameter.
- adafactor is transformers.optimization.Adafactor with its defaults (relative_step, scale_parameter): factored
  fp32 second moments for matrices.
- LoRA adapts nn.Linear modules only (bitsandbytes' Linear4bit/8bitLt included); MoE experts, which transformers 5
  stores as fused 3-D parameters, stay frozen. PEFT 0.21 would remap transformers-4 expert names (gate_proj, w1,
  ...) onto those fused parameters for mixtral / qwen2_moe (peft/utils/transformers_weight_conversion.py) --
  even for "all-linear" -- and its ParamWrapper then refuses lora_dropout != 0; the recipe skips that remap
  (`_no_moe_remap`) so the targets mean the same thing for every architecture.
- Gradient checkpointing is HF's, non-reentrant (use_reentrant=False, the transformers default);
  --activation-offload checkpoints is transformers' own offload=True; --activation-offload all is TRL's
  OffloadActivations around forward and backward (SFTTrainer(activation_offloading=True)).
- The loss is computed inside the model (labels=input_ids) and only the loss is kept, as HF Trainer does:
  the logits are freed as soon as the loss no longer needs them.
"""
from __future__ import annotations

import contextlib
import warnings

from memplan.errors import MemplanError
from memplan.spec import ModelSpec, TrainSpec

# Attention projections by attribute name, for every architecture in memplan.architectures.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv_proj", "query_key_value", "dense")
QV_MODULES = {"q_proj", "v_proj"}
FUSED_QKV = ("qkv_proj", "query_key_value")

_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "uint8": "uint8"}


def torch_dtype(train: TrainSpec):
    import torch

    return torch.float32 if train.bits == 32 else getattr(torch, _TORCH_DTYPES[train.compute_dtype])


def bnb_config(train: TrainSpec):
    """The BitsAndBytesConfig a QLoRA script passes to from_pretrained (None when not quantized)."""
    if not train.quantized:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if train.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=train.quant_type, bnb_4bit_use_double_quant=train.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, _TORCH_DTYPES[train.compute_dtype]),
        bnb_4bit_quant_storage=getattr(torch, _TORCH_DTYPES.get(getattr(train, "storage", "uint8"), "uint8")),
    )


def _layer_linear_names(model: ModelSpec) -> list[str]:
    names = []
    for _, layer in model.layers:
        for lin in layer.linears:
            if lin.name not in names:
                names.append(lin.name)
    return names


def lora_targets(model: ModelSpec, train: TrainSpec) -> str | list[str]:
    """PEFT target_modules: "qv" -> q/v (or the fused qkv), "attn" -> every attention projection, "all-linear"
    -> PEFT's "all-linear" (every linear but the output layer), or the given module names."""
    names = _layer_linear_names(model)
    targets = train.lora_targets
    if targets == "all-linear":
        return "all-linear"
    if targets == "qv":
        picked = [n for n in names if n in QV_MODULES] or [n for n in names if n in FUSED_QKV]
    elif targets == "attn":
        picked = [n for n in names if n in ATTENTION_MODULES]
    else:
        from memplan.estimate.experts import layer_linears

        known = set(names) | {"lm_head", "embed_tokens", "gate"}
        known |= {lin.name for _, layer in model.layers for _, lin in layer_linears(model, layer, train)}
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise MemplanError(f"lora-targets: {model.name} has no module named {', '.join(unknown)}; "
                               f"its layer linears are {', '.join(names)}")
        picked = list(targets)
    if not picked:
        raise MemplanError(f"lora-targets {targets!r} matches no linear of {model.name} ({', '.join(names)})")
    return picked


def lora_config(model: ModelSpec, train: TrainSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
        target_modules=lora_targets(model, train), use_dora=train.dora, bias="none", task_type="CAUSAL_LM",
        modules_to_save=list(train.modules_to_save) or None,
    )


def enable_checkpointing(model, offload: bool = False) -> None:
    """HF gradient checkpointing, non-reentrant; offload=True is transformers' offloaded checkpointing
    (activation_checkpointing_enable(offload=True): save_on_cpu(pin_memory=True) around each checkpointed layer)."""
    kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)
        elif offload:
            raise MemplanError("--activation-offload checkpoints needs transformers' activation_checkpointing_enable"
                               "(offload=True) (transformers >= 5)")
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_recipe(model, model_spec: ModelSpec, train: TrainSpec):
    """Turn a loaded (possibly bitsandbytes-quantized) transformers model into the model a script trains."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        offload = train.activation_offload == "checkpoints"
        if train.method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            if train.gradient_checkpointing:
                enable_checkpointing(model, offload)
            model.train()
            return model
        from peft import get_peft_model, prepare_model_for_kbit_training

        if train.upcast_applies:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=train.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
            if offload:  # PEFT enables plain checkpointing; the offloaded variant replaces its checkpoint function
                enable_checkpointing(model, offload)
        elif train.gradient_checkpointing:
            enable_checkpointing(model, offload)
        dtype_name = _TORCH_DTYPES[train.lora_dtype]
        autocast = train.lora_dtype == "fp32"
        with _no_moe_remap():
            peft_model = get_peft_model(model, lora_config(model_spec, train), autocast_adapter_dtype=autocast)
        if not autocast:
            dtype = getattr(torch, dtype_name)
            for name, p in peft_model.named_parameters():
                if p.requires_grad and "lora_" in name:
                    p.data = p.data.to(dtype)
        peft_model.train()
        return peft_model


@contextlib.contextmanager
def _no_moe_remap():
    """Skip PEFT's transformers-4 -> 5 MoE target remap (see the module docstring)."""
    try:
        import peft.tuners.tuners_utils as tu
    except ImportError:  # pragma: no cover
        yield
        return
    saved = getattr(tu, "is_transformers_ge_v5", None)
    if saved is None:
        yield
        return
    tu.is_transformers_ge_v5 = False
    try:
        yield
    finally:
        tu.is_transformers_ge_v5 = saved


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, train: TrainSpec, *, paged: bool = True):
    """The optimizer for `train.optimizer`. paged=False accounts paged optimizers as their non-paged twins."""
    import torch

    params = list(params)
    name = train.optimizer
    lr = 2e-4
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=None, scale_parameter=True, relative_step=True, warmup_init=False)
    import bitsandbytes as bnb

    if name == "adamw-8bit":
        return bnb.optim.AdamW8bit(params, lr=lr)
    if name == "paged-adamw":
        return bnb.optim.PagedAdamW(params, lr=lr) if paged else bnb.optim.AdamW(params, lr=lr, optim_bits=32)
    if name == "paged-adamw-8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr) if paged else bnb.optim.AdamW8bit(params, lr=lr)
    raise MemplanError(f"unsupported optimizer {name!r}")


def _noop(_phase: str) -> None:
    pass


def warm_optimizer(optimizer, params) -> None:
    """Create the optimizer's lazily made states as its first step() would: one step on zero gradients."""
    import torch

    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def apply_liger(model, train: TrainSpec) -> None:
    """--liger on (GPU runs): liger-kernel's own instance patch, RMSNorm + SwiGLU/GeGLU + RoPE (its loss is
    --loss liger's business, so the cross-entropy patches stay off)."""
    if not train.liger:
        return
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def activation_offload_context(model, train: TrainSpec):
    """--activation-offload all on a GPU: TRL's OffloadActivations (trl.models.get_act_offloading_ctx_manager, its
    defaults), entered around forward and backward as SFTTrainer.training_step does. None otherwise."""
    if train.activation_offload != "all":
        return None
    try:
        from trl.models import get_act_offloading_ctx_manager
    except ImportError as e:
        raise MemplanError(f"--activation-offload all runs TRL's OffloadActivations: pip install trl ({e})") from None
    return get_act_offloading_ctx_manager(model, warn_if_no_head=False)


def fused_loss_fn(train: TrainSpec):
    """The real fused linear cross-entropy for --loss liger | cce (GPU runs): fn(hidden, weight, labels, softcap)."""
    if train.loss == "liger":
        from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss

        return lambda h, w, labels, softcap=None: LigerForCausalLMLoss(
            h, w, labels, h.shape[-1], final_logit_softcapping=softcap)
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, labels, softcap=None: linear_cross_entropy(h, w, labels, softcap=softcap, shift=1)


def compute_loss(model, input_ids, train: TrainSpec, fused=None):
    """The loss as the training script computes it. standard: the model's own (labels=input_ids: b·s·V logits,
    ForCausalLMLoss). liger / cce: the decoder's final hidden states go straight into the fused linear
    cross-entropy with the output layer's weight (what Liger's lce_forward and axolotl's CCE patch do), so no
    logits tensor exists; `fused` replaces the library function (the trace's models)."""
    import torch

    if train.loss == "standard":
        return model(input_ids=input_ids, labels=input_ids).loss
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor) or "lm_head" in train.modules_to_save:
        raise MemplanError(f"--loss {train.loss} takes the output layer's weight as a plain tensor; a LoRA- or "
                           "modules_to_save-wrapped lm_head is not supported")
    hidden = base.base_model(input_ids=input_ids).last_hidden_state
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return (fused or fused_loss_fn(train))(hidden, head.weight, input_ids, softcap)


def train_step(model, optimizer, input_ids, on_phase=_noop, step_context=None, train: TrainSpec | None = None,
               fused_loss=None):
    """One training step as a script runs it; returns the loss as a Python-free (detached) tensor. step_context
    (activation offloading) wraps forward and backward."""
    with step_context if step_context is not None else contextlib.nullcontext():
        on_phase("forward")
        if train is None or train.loss == "standard":
            loss = model(input_ids=input_ids, labels=input_ids).loss
        else:
            loss = compute_loss(model, input_ids, train, fused_loss)
        on_phase("backward")
        loss.backward()
        value = loss.detach()
        del loss  # as HF Trainer (training_step returns loss.detach()): the graph's nodes die before step()
    on_phase("optimizer")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value
