"""Build the transformers model from a ModelSpec on meta (or CPU) and quantize it as from_pretrained would."""
from __future__ import annotations

import contextlib
import copy
import warnings

from memplan.errors import MemplanError
from memplan.spec import ModelSpec, TrainSpec


_BNB_READY = False
_STORAGE_DTYPES: dict = {}  # quant_storage name -> torch dtype (filled where torch is imported)


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

    # a deep copy: transformers edits nested dicts (rope_scaling) in place, and the spec's config keys caches
    cfg = copy.deepcopy({k: v for k, v in model.hf_config.items() if k != "model_type"})
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
    with warnings.catch_warnings(), _flash_attention_2_buildable(attn):
        warnings.simplefilter("ignore")
        with torch.device(device):
            if real:
                torch.manual_seed(0)
            hf = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    hf.config.use_cache = False
    if train.quantized:
        _quantize(hf, train, real=real)
    return hf


@contextlib.contextmanager
def _flash_attention_2_buildable(attn: str):
    """Let transformers build a model with attn_implementation="flash_attention_2" where flash-attn is not
    installed: its availability check (PreTrainedModel._check_and_adjust_attn_implementation) passes the name
    through, and Falcon's FalconFlashAttention2 finds `_flash_attention_forward`, which modeling_falcon imports
    only when flash-attn is importable. The kernel itself is modelled at run time (kernels.py)."""
    if attn != "flash_attention_2":
        yield
        return
    import transformers.modeling_flash_attention_utils as mfu
    from transformers import PreTrainedModel
    from transformers.models.falcon import modeling_falcon

    original = PreTrainedModel._check_and_adjust_attn_implementation
    had = hasattr(modeling_falcon, "_flash_attention_forward")

    def check(self, attn_implementation, *args, **kwargs):
        if attn_implementation == "flash_attention_2":
            return attn_implementation
        return original(self, attn_implementation, *args, **kwargs)

    PreTrainedModel._check_and_adjust_attn_implementation = check
    if not had:
        modeling_falcon._flash_attention_forward = mfu._flash_attention_forward
    try:
        yield
    finally:
        PreTrainedModel._check_and_adjust_attn_implementation = original
        if not had:
            del modeling_falcon._flash_attention_forward


def _quantize(hf, train: TrainSpec, *, real: bool) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    import torch
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # transformers 4.x keeps it in the bitsandbytes integration
        from transformers.integrations.bitsandbytes import get_keys_to_not_convert

    from memplan import recipe
    from memplan.stack import installed_major

    _bnb_warmup()
    _STORAGE_DTYPES.update(uint8=torch.uint8, bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)
    qconfig = recipe.bnb_config(train)
    keep = get_keys_to_not_convert(hf)
    # which modules replace_with_bnb_linear converts: 5.x only `type(m) is nn.Linear`, 4.x any nn.Linear instance
    # (subclasses such as Falcon's FalconLinear included; integrations/bitsandbytes.py _replace_with_bnb_linear)
    if installed_major() == 4:
        originals = {name: m for name, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    else:
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
                # bnb_4bit_quant_storage: the same packed bytes, viewed as a float dtype so FSDP / ZeRO-3 can
                # shard them; the module keeps the quant state, as bitsandbytes' FSDP path expects
                # (fix_4bit_weight_quant_state_from_module restores it on the all-gathered weight).
                storage = _STORAGE_DTYPES[getattr(train, "storage", "uint8")]
                packed, qs = bf.quantize_4bit(w, blocksize=64, compress_statistics=train.double_quant,
                                              quant_type=train.quant_type, quant_storage=storage)
                module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=64,
                                                  compress_statistics=train.double_quant,
                                                  quant_type=train.quant_type, quant_storage=storage,
                                                  module=module, bnb_quantized=True)
                module.quant_state, module.quant_storage = qs, storage
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
    for module in hf.modules():  # what from_pretrained's quantizer marks (quantizers/base.py _assign_is_quantized);
        if hasattr(module, "config"):  # flash_attention_2 then casts fp32 q/k/v to config.dtype
            module.config._is_quantized = True
    hf.config.quantization_config = qconfig
