"""torchtune recipe configs (`tune run lora_finetune_single_device --config FILE.yaml`; recipes/configs/*/ in
torchtune 0.6.1), mapped where torchtune runs the same memory-relevant computation as the stack memplan models,
and said plainly where it does not.

Not the same stack:
- QLoRA (`qlora_*` builders, `quantize_base: True`) stores the frozen weights as torchao's NF4Tensor, not
  bitsandbytes' Params4bit. The bytes of the stored weights match memplan's NF4 + double quantization (4-bit
  codes, one 8-bit scaler per 64-block, one fp32 scale per 256 scalers: torchao/dtypes/nf4tensor.py defaults
  block_size=64, scaler_block_size=256), but the dequantize temporaries and the autograd path are torchao's
  (linear_nf4), which `memplan trace` / `profile` do not run: their figures describe the bitsandbytes equivalent.
- torchtune never runs PEFT's prepare_model_for_kbit_training (upcast off) and builds the LoRA adapters in the
  model dtype (`dtype: bf16`), not PEFT's fp32.
- Its own modules (TransformerDecoder, MultiHeadAttention calling SDPA) stand in for transformers'; activation
  checkpointing wraps each layer like HF's non-reentrant checkpointing.
- CEWithChunkedOutputLoss upcasts the logits to fp32 chunk by chunk (8 chunks): the standard loss memplan models
  is higher by up to the fp32 logits' 7/8.
"""
from __future__ import annotations

import re
from pathlib import Path

from memplan.integrations.config import Key, Mapping, Reader, boolean, dropout, positive, when_on
from memplan.integrations.distributed import multi_gpu

# torchtune model builders (torchtune/models/*/_model_builders.py) -> catalog names.
MODELS = {
    "llama2_7b": "llama-2-7b", "llama2_13b": "llama-2-13b", "llama2_70b": "llama-2-70b",
    "llama3_8b": "llama-3-8b", "llama3_70b": "llama-3-70b", "llama3_1_8b": "llama-3.1-8b",
    "llama3_1_70b": "llama-3.1-70b", "llama3_1_405b": "llama-3.1-405b", "llama3_2_1b": "llama-3.2-1b",
    "llama3_2_3b": "llama-3.2-3b", "llama3_3_70b": "llama-3.3-70b", "mistral_7b": "mistral-7b-v0.1",
    "code_llama2_7b": "codellama-7b", "code_llama2_13b": "codellama-13b", "gemma_2b": "gemma-2b",
    "gemma_7b": "gemma-7b", "gemma2_2b": "gemma-2-2b", "gemma2_9b": "gemma-2-9b", "gemma2_27b": "gemma-2-27b",
    "phi3_mini": "phi-3-mini-4k",
}
# torchtune module names -> transformers' (torchtune/models/convert_weights.py _FROM_HF, inverted)
ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
MLP = ("gate_proj", "up_proj", "down_proj")  # w1, w3, w2
OPTIMIZERS = {
    "torch.optim.AdamW": "adamw", "torch.optim.Adam": "adamw", "torch.optim.SGD": "sgd",
    "bitsandbytes.optim.AdamW8bit": "adamw-8bit", "bitsandbytes.optim.PagedAdamW": "paged-adamw",
    "bitsandbytes.optim.PagedAdamW32bit": "paged-adamw", "bitsandbytes.optim.PagedAdamW8bit": "paged-adamw-8bit",
}
NO_EFFECT = "no effect on per-step memory"
REASONS = {
    "output_dir": "where torchtune writes", "metric_logger": "logging", "log_every_n_steps": "logging",
    "log_peak_memory_stats": "logging", "profiler": "profiling off", "epochs": NO_EFFECT,
    "max_steps_per_epoch": NO_EFFECT, "lr_scheduler": NO_EFFECT, "seed": NO_EFFECT, "clip_grad_norm": NO_EFFECT,
    "gradient_accumulation_steps": "gradients accumulate into the same buffers: no effect on per-step memory",
    "resume_from_checkpoint": NO_EFFECT, "save_adapter_weights_only": NO_EFFECT, "device": "one device: cuda",
    "compile": "torch.compile is not modelled (the estimate is for eager mode)", "low_cpu_ram": "host memory only",
    "tokenizer": "its max_seq_len is read; the tokenizer itself is given to --tokenizer", "checkpointer":
    "its checkpoint_dir locates the model", "dataset": "its packed flag is read; the data comes from --dataset",
    "run_val_every_n_steps": "evaluation only", "dataset_val": "evaluation only",
}

# keys only the *_distributed recipes' configs carry (torchtune 0.6.1)
DISTRIBUTED = ("fsdp_cpu_offload", "fsdp_reshard_after_forward", "data_parallel_shard_dim",
               "data_parallel_replicate_dim", "memory_efficient_fsdp_wrap", "custom_sharded_layers")
BATCH = (Key("batch_size", "batch_size", positive, 1, origin="(default 1)"),)
LORA = (Key("lora_rank", "lora_r", positive, 8, origin="(default 8)"),  # torchtune's lora_* builders' defaults
        Key("lora_alpha", "lora_alpha", positive, 16, origin="(default 16)"),
        Key("lora_dropout", "lora_dropout", dropout, 0.0, origin="(default 0.0)"),
        Key("use_dora", "dora", when_on(True)))
# training.py OffloadActivations (torchtune 0.6.1): every saved tensor to pinned host memory, checkpointing or not
CHECKPOINTING = (Key("enable_activation_checkpointing", "gradient_checkpointing", boolean, False,
                     origin="(default false)"),
                 Key("enable_activation_offloading", "activation_offload", when_on("all"),
                     why="torchtune's OffloadActivations: every saved tensor to host RAM"))


def read(r: Reader) -> Mapping:
    m = r.m
    model = r.get("model", dict)
    if not model or "_component_" not in model:
        raise r.error("model", "a torchtune config needs model: {_component_: torchtune.models....}")
    comp = r.get("_component_", str, where=model, prefix="model.")
    builder = comp.rsplit(".", 1)[-1]
    match = re.fullmatch(r"(qlora_|lora_)?(\w+?)(_base|_instruct)?", builder)
    kind, name = (match.group(1) or "", match.group(2)) if match else ("", builder)
    _model(r, comp, name)

    # ---- dtype, weights, method
    dtype = r.get("dtype", str, "bf16")
    if dtype not in ("bf16", "fp32", "fp16"):
        raise r.error("dtype", f"expected bf16 or fp32 (torchtune), got {dtype!r}")
    r.set("compute_dtype", dtype, "dtype", dtype)
    quantized = kind == "qlora_" or r.get("quantize_base", bool, False, where=model, prefix="model.")
    if quantized:
        r.set("bits", 4, "model._component_", builder, "torchao NF4 (see the note)")
        r.set("quant_type", "nf4", "model._component_", builder)
        r.set("double_quant", True, "model._component_", builder, "torchao's 8-bit scalers per 64-block")
        m.notes.append("torchao NF4 is not bitsandbytes: the stored weight bytes match bitsandbytes NF4 with double "
                       "quantization, but torchao's dequantize temporaries and autograd path differ; trace/profile "
                       "run bitsandbytes, so their figures describe the bitsandbytes equivalent of this run")
    else:
        r.set("bits", 32 if dtype == "fp32" else 16, "dtype", dtype, "weights in the model dtype")
    r.set("method", "lora" if kind or "lora_rank" in model else "full", "model._component_", builder)
    if m.settings["method"] == "lora":
        r.set("upcast", False, "model._component_", builder, "torchtune never runs prepare_model_for_kbit_training")
        r.set("lora_dtype", dtype, "dtype", dtype, "torchtune builds the adapters in the model dtype")
        _lora(r, model)
    for key in model:
        if key not in ("_component_", "lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank",
                       "lora_alpha", "lora_dropout", "use_dora", "quantize_base"):
            m.ignored.append((f"model.{key}", "not a memory setting memplan reads"))

    # ---- shapes
    r.apply(BATCH)
    tok = r.get("tokenizer", dict, {})
    max_len = r.get("max_seq_len", int, where=tok, prefix="tokenizer.")
    if max_len is not None:
        if max_len <= 0:
            raise r.error("tokenizer.max_seq_len", f"must be a positive integer, got {max_len}")
        r.set("seq_len", max_len, "tokenizer.max_seq_len", max_len,
              "the longest step; --dataset gives each step's length")
    else:
        m.notes.append("tokenizer.max_seq_len is null: torchtune does not truncate, so the longest sample sets the "
                       "peak; give --dataset (or --seq-len)")
    data = r.get("dataset", (dict, list), {})
    first = data[0] if isinstance(data, list) and data else data
    packed = bool(isinstance(first, dict) and first.get("packed"))
    m.data.update(packing=packed, max_length=max_len, too_long="truncate",
                  order="shuffled" if r.get("shuffle", bool, True) else "sequential")
    ckpt_dir = (r.get("checkpointer", dict, {}) or {}).get("checkpoint_dir")
    if ckpt_dir:
        m.data["tokenizer"] = ckpt_dir

    # ---- checkpointing, offloading, optimizer, loss
    r.apply(CHECKPOINTING)
    r.set("attention", "sdpa", "model._component_", builder, "torchtune's attention calls SDPA")
    opt = r.get("optimizer", dict)
    if opt:
        oc = r.get("_component_", str, where=opt, prefix="optimizer.")
        if oc in OPTIMIZERS:
            r.set("optimizer", OPTIMIZERS[oc], "optimizer._component_", oc)
        elif oc.startswith(("torchao.", "torch.optim.")):
            r.not_modelled("optimizer", f"{oc}: memplan has no formula for its states", oc)
            r.defer("optimizer", "optimizer._component_", f"optimizer {oc!r} is not modelled by memplan (it models "
                    f"{', '.join(OPTIMIZERS)}); pass --optimizer to estimate with one of those")
        else:
            raise r.error("optimizer._component_", f"unknown optimizer {oc!r}; known: {', '.join(OPTIMIZERS)}")
    if r.get("optimizer_in_bwd", bool, False):
        r.not_modelled("optimizer_in_bwd", "steps each parameter in backward (gradients never all live); the "
                                           "estimate keeps the usual gradient lifetime")
    loss = (r.get("loss", dict, {}) or {}).get("_component_", "")
    if loss.endswith("CEWithChunkedOutputLoss"):
        r.not_modelled("loss", "chunked cross-entropy upcasts logits 1/8 at a time; the estimate's standard loss is "
                               "higher by up to 7/8 of the fp32 logits", loss)
    elif loss.endswith("LinearCrossEntropyLoss"):
        r.set("loss", "cce", "loss", loss, "torchtune's LinearCrossEntropyLoss runs Cut Cross-Entropy (no b·s·V "
                                           "logits)")
    # the *_distributed recipes (FSDP2 fully_shard; the recipe, and so the GPU count, is on `tune run`'s command
    # line): their configs carry these keys
    signals = [k for k in DISTRIBUTED if r.has(k)]
    if signals:
        offload = r.get("fsdp_cpu_offload", bool, False)
        reshard = r.get("fsdp_reshard_after_forward", bool, True)
        for k in DISTRIBUTED[2:]:
            r.get(k, (bool, int, list))
        multi_gpu(r, signals[0], "fsdp" if reshard else "fsdp-grad-op", fsdp_version=2,
                  offload="params" if offload else "none", shown=r.raw[signals[0]],
                  why="torchtune's *_distributed recipes shard with FSDP2 (fully_shard)")
    elif "single_device" not in Path(r.path).name:
        m.notes.append("the recipe (lora_finetune_single_device or a *_distributed one) is on `tune run`'s command "
                       "line, not in this file: the estimate is for one device; for a distributed recipe add "
                       "--parallel fsdp --fsdp-version 2 --gpus N")
    if (r.get("tensor_parallel_dim", int) or 1) > 1:
        r.not_modelled("tensor_parallel_dim", "tensor parallelism is not modelled (memplan models data parallelism)")
    return r.finish(REASONS, "not a torchtune key memplan reads")


def _model(r: Reader, comp: str, name: str) -> None:
    """The model: the checkpoint folder's config.json when it is on this machine, else the catalog model the
    builder names."""
    m = r.m
    ckpt = r.raw.get("checkpointer") if isinstance(r.raw.get("checkpointer"), dict) else {}
    folder = ckpt.get("checkpoint_dir")
    if isinstance(folder, str) and (Path(folder).expanduser() / "config.json").is_file():
        m.model, m.model_key = folder, "checkpointer.checkpoint_dir"
        return
    qwen = re.fullmatch(r"qwen2_5_(\d+)_?(\d*)b", name)
    catalog = MODELS.get(name) or (f"qwen2.5-{qwen.group(1)}{'.' + qwen.group(2) if qwen.group(2) else ''}b"
                                   if qwen else None)
    if catalog is None:
        raise r.error("model._component_", f"no catalog model for torchtune builder {comp!r}; put the model's "
                      "config.json in checkpointer.checkpoint_dir or give MODEL on the command line")
    m.model, m.model_key = catalog, "model._component_"


def _lora(r: Reader, model: dict) -> None:
    r.apply(LORA, where=model, prefix="model.")
    attn = r.get("lora_attn_modules", list, [], where=model, prefix="model.")
    unknown = [a for a in attn if a not in ATTN]
    if unknown:
        raise r.error("model.lora_attn_modules", f"unknown module {unknown[0]!r}; torchtune has "
                      f"{', '.join(ATTN)}")
    mlp = r.get("apply_lora_to_mlp", bool, False, where=model, prefix="model.")
    names = [ATTN[a] for a in attn] + (list(MLP) if mlp else [])
    if not names:
        raise r.error("model.lora_attn_modules", "no LoRA targets (empty, and apply_lora_to_mlp is false)")
    shown = f"{attn} + mlp" if mlp else attn
    if set(names) == set(ATTN.values()) | set(MLP):
        r.set("lora_targets", "all-linear", "model.lora_attn_modules", shown)
    elif set(names) == set(ATTN.values()):
        r.set("lora_targets", "attn", "model.lora_attn_modules", shown)
    elif set(names) == {"q_proj", "v_proj"}:
        r.set("lora_targets", "qv", "model.lora_attn_modules", shown)
    else:
        r.set("lora_targets", tuple(names), "model.lora_attn_modules", shown, "torchtune names as transformers'")
    if r.get("apply_lora_to_output", bool, False, where=model, prefix="model."):
        r.not_modelled("model.apply_lora_to_output", "LoRA on the output projection is not modelled", True)
