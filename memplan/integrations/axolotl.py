"""axolotl YAML configs (schema: axolotl/utils/schemas/*.py, axolotl 0.19; docs.axolotl.ai/docs/config-reference).

What axolotl does with them, where it changes memory (axolotl/loaders/model.py, v0.19):
- `adapter: qlora` + `load_in_4bit` loads BitsAndBytesConfig(nf4, bnb_4bit_use_double_quant=True,
  bnb_4bit_quant_storage=bf16) unless `bnb_config_kwargs` overrides; `adapter: lora` + `load_in_8bit` LLM.int8;
  no adapter is full fine-tuning in the `bf16`/`fp16` dtype.
- `_prepare_model_for_quantization` calls PEFT's prepare_model_for_kbit_training for lora/qlora on 4/8-bit
  weights (upcast on), except under FSDP-QLoRA or ZeRO-3.
- defaults that differ from memplan's: sequence_len 512, micro_batch_size 1, optimizer adamw_torch_fused,
  gradient_checkpointing false, lora_dropout 0.0, lora_r/lora_alpha PEFT's 8/8.
- sequences longer than sequence_len are dropped by default (excess_length_strategy: drop).
"""
from __future__ import annotations

from memplan.integrations.config import (Mapping, Reader, attention_from_hf, compute_dtype, deepspeed_settings,
                                         lora_targets_from_names, multi_gpu, optimizer_from_hf)
from memplan.spec import TRAIN_FIELDS

NO_EFFECT = "no effect on per-step memory"
REASONS = {
    "learning_rate": NO_EFFECT, "lr_scheduler": NO_EFFECT, "warmup_steps": NO_EFFECT, "warmup_ratio": NO_EFFECT,
    "weight_decay": NO_EFFECT, "max_grad_norm": NO_EFFECT, "num_epochs": NO_EFFECT, "max_steps": NO_EFFECT,
    "cosine_min_lr_ratio": NO_EFFECT, "adam_beta1": NO_EFFECT, "adam_beta2": NO_EFFECT, "adam_epsilon": NO_EFFECT,
    "seed": NO_EFFECT, "tf32": NO_EFFECT, "train_on_inputs": NO_EFFECT, "strict": NO_EFFECT,
    "peft_use_rslora": "rsLoRA changes the scale, not the bytes",
    "gradient_accumulation_steps": "gradients accumulate into the same buffers: no effect on per-step memory",
    "output_dir": "where axolotl writes", "dataset_prepared_path": "where axolotl writes",
    "val_set_size": "evaluation split; memplan plans the training step", "eval_batch_size": "evaluation only",
    "evals_per_epoch": "evaluation only", "eval_steps": "evaluation only", "eval_sample_packing": "evaluation only",
    "eval_sequence_len": "evaluation only", "saves_per_epoch": "checkpoint saving", "save_steps": "checkpoint saving",
    "save_total_limit": "checkpoint saving", "save_safetensors": "checkpoint saving", "logging_steps": "logging",
    "wandb_*": "logging", "mlflow_*": "logging", "hub_*": "hub upload", "special_tokens": "tokenizer only",
    "tokenizer_type": "tokenizer only", "model_type": "the architecture comes from the model's config.json",
    "tokenizer_use_fast": "tokenizer only", "trust_remote_code": "pass --trust-remote-code to memplan itself",
    "resume_from_checkpoint": NO_EFFECT, "early_stopping_patience": NO_EFFECT, "local_rank": NO_EFFECT,
    "debug": NO_EFFECT, "xformers_attention": "xformers attention is not modelled; the estimate uses sdpa",
    "sample_packing_eff_est": "packing efficiency estimate; --dataset packs the real lengths",
    "lora_fan_in_fan_out": NO_EFFECT, "lora_model_dir": "adapter weights to resume from: same bytes",
    "dataset_processes": NO_EFFECT, "shuffle_merged_datasets": NO_EFFECT,
    "flash_attn_cross_entropy": "flash-attn's fused loss is not modelled", "flash_attn_rms_norm": NO_EFFECT,
    "flash_attn_fuse_mlp": NO_EFFECT, "flash_optimum": NO_EFFECT, "unfrozen_parameters": "not modelled",
}


def read(r: Reader) -> Mapping:
    m = r.m
    model = r.get("base_model_config", str) or r.get("base_model", str)
    r.get("base_model", str)
    if model:
        m.model, m.model_key = model, "base_model_config" if r.has("base_model_config") else "base_model"
    m.data["tokenizer"] = r.get("tokenizer_config", str) or model

    # ---- weights: adapter, bits, dtype
    adapter = r.get("adapter", str)
    four, eight = r.get("load_in_4bit", bool, False), r.get("load_in_8bit", bool, False)
    if four and eight:
        raise r.error("load_in_4bit/load_in_8bit", "4-bit and 8-bit are both on; choose one")
    bf16, fp16 = r.get("bf16", (bool, str)), r.get("fp16", bool)
    if isinstance(bf16, str) and bf16 != "auto":
        raise r.error("bf16", f"expected true, false or auto, got {bf16!r}")
    compute_dtype(r, bf16, fp16)
    if adapter not in (None, "lora", "qlora"):
        raise r.error("adapter", f"unknown adapter {adapter!r}; memplan models lora and qlora (or no adapter: "
                      "full fine-tuning)")
    if adapter == "qlora" and not four:
        raise r.error("adapter", "qlora needs load_in_4bit: true (axolotl loads 4-bit weights only then)")
    if adapter is None and (four or eight):
        raise r.error("load_in_4bit" if four else "load_in_8bit",
                      "quantized weights are frozen: set adapter: lora or qlora")
    dtype_bits = 16 if m.settings.get("compute_dtype") in ("bf16", "fp16") else 32
    if four:
        r.set("bits", 4, "load_in_4bit", True)
    elif eight:
        r.set("bits", 8, "load_in_8bit", True)
    else:
        r.set("bits", dtype_bits, "bf16/fp16", bf16 if bf16 is not None else fp16, "weights in the compute dtype")
    r.set("method", "lora" if adapter else "full", "adapter", adapter if adapter else "(none)")
    bnb = r.get("bnb_config_kwargs", dict, {})
    if four:
        qt = r.get("bnb_4bit_quant_type", str, "nf4", where=bnb, prefix="bnb_config_kwargs.")
        if qt not in ("nf4", "fp4"):
            raise r.error("bnb_config_kwargs.bnb_4bit_quant_type", f"expected nf4 or fp4, got {qt!r}")
        dq = r.get("bnb_4bit_use_double_quant", bool, True, where=bnb, prefix="bnb_config_kwargs.")
        r.set("quant_type", qt, "bnb_config_kwargs.bnb_4bit_quant_type", qt if "bnb_4bit_quant_type" in bnb
              else "(axolotl default nf4)")
        r.set("double_quant", dq, "bnb_config_kwargs.bnb_4bit_use_double_quant",
              dq if "bnb_4bit_use_double_quant" in bnb else "(axolotl default true)")
        storage = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "uint8": "uint8"}
        qs = str(bnb.get("bnb_4bit_quant_storage", "bfloat16")).replace("torch.", "")
        if "quant_storage" in TRAIN_FIELDS or "bnb_4bit_quant_storage" in bnb:
            r.set_guarded("quant_storage", storage.get(qs, qs), "bnb_config_kwargs.bnb_4bit_quant_storage",
                          qs, absent="the storage dtype matters only for FSDP sharding of 4-bit weights")
    deepspeed, fsdp_cfg = r.get("deepspeed", (str, dict)), r.get("fsdp_config", dict)
    zero3 = isinstance(deepspeed, (str, dict)) and "zero3" in str(deepspeed)
    if adapter and (four or eight):
        skip = (four and fsdp_cfg) or zero3
        r.set("upcast", not skip, "adapter", adapter,
              "axolotl skips prepare_model_for_kbit_training under FSDP-QLoRA / ZeRO-3" if skip else
              "axolotl calls PEFT prepare_model_for_kbit_training on 4/8-bit weights")
    if r.get("embeddings_skip_upcast", bool):
        r.not_modelled("embeddings_skip_upcast", "axolotl's patched upcast keeps embed_tokens/lm_head 16-bit; "
                                                 "memplan models PEFT's upcast of every non-quantized weight")

    # ---- LoRA
    if adapter:
        r.set("lora_r", r.positive("lora_r", 8), "lora_r", r.raw.get("lora_r", "(PEFT default 8)"))
        r.set("lora_alpha", r.positive("lora_alpha", 8), "lora_alpha", r.raw.get("lora_alpha", "(PEFT default 8)"))
        drop = r.get("lora_dropout", float, 0.0)
        if not 0 <= drop < 1:
            raise r.error("lora_dropout", f"must be in [0, 1), got {drop}")
        r.set("lora_dropout", drop, "lora_dropout", r.raw.get("lora_dropout", "(axolotl default 0.0)"))
        linear = r.get("lora_target_linear", bool, False)
        names = r.get("lora_target_modules", (list, str))
        if isinstance(names, str):
            names = [names]
        if linear:
            r.set("lora_targets", "all-linear", "lora_target_linear", True,
                  "every linear but lm_head (axolotl find_all_linear_names)")
            if names:
                m.notes.append("lora_target_modules is inside lora_target_linear's all-linear set")
        elif names:
            lora_targets_from_names(r, "lora_target_modules", names)
        else:
            raise r.error("lora_target_modules", "no LoRA targets: set lora_target_modules or lora_target_linear")
        save = r.get("lora_modules_to_save", list)
        if save:
            r.set("modules_to_save", tuple(save), "lora_modules_to_save", save)
        if r.get("peft_use_dora", bool, False):
            r.set("dora", True, "peft_use_dora", True)
        if r.get("peft_autocast_adapter_dtype", bool) is False:
            r.set("lora_dtype", m.settings.get("compute_dtype", "fp32"), "peft_autocast_adapter_dtype", False,
                  "adapters stay in the base dtype")

    # ---- shapes
    seq = r.positive("sequence_len", 512)
    r.set("seq_len", seq, "sequence_len", r.raw.get("sequence_len", "(axolotl default 512)"),
          "the longest step; --dataset gives each step's length")
    r.set("batch_size", r.positive("micro_batch_size", 1), "micro_batch_size",
          r.raw.get("micro_batch_size", "(axolotl default 1)"))
    packing = r.get("sample_packing", bool, False)
    pad = r.get("pad_to_sequence_len", bool, packing)
    strategy = r.get("excess_length_strategy", str, "drop")
    if strategy not in ("drop", "truncate", "raise"):
        raise r.error("excess_length_strategy", f"expected drop, truncate or raise, got {strategy!r}")
    m.data.update(packing=packing, pad_to_max=pad, max_length=seq, too_long=strategy,
                  order="group_by_length" if r.get("group_by_length", bool, False) else "shuffled")
    _datasets(r)

    # ---- checkpointing, attention, optimizer
    gc = r.get("gradient_checkpointing", (bool, str), False)
    if isinstance(gc, str) and gc not in ("offload", "offload_disk"):
        raise r.error("gradient_checkpointing", f"expected true, false, offload or offload_disk, got {gc!r}")
    r.set("gradient_checkpointing", bool(gc), "gradient_checkpointing", gc)
    if gc == "offload":
        r.set_guarded("activation_offload", "checkpoints", "gradient_checkpointing", gc,
                      absent="the checkpointed layer inputs go to host memory; the estimate keeps them on the GPU")
    elif gc == "offload_disk":
        r.not_modelled("gradient_checkpointing", "checkpoints offloaded to disk: the estimate keeps them on the GPU")
    kw = r.get("gradient_checkpointing_kwargs", dict, {})
    if kw.get("use_reentrant") is True:
        m.notes.append("use_reentrant: true keeps the same layer inputs; memplan models non-reentrant checkpointing")
    offload = r.get("activation_offloading", (bool, str), False)
    if offload:
        r.set_guarded("activation_offload", "all", "activation_offloading", offload,
                      absent="activations go to host memory; the estimate keeps them on the GPU")
    impl = r.get("attn_implementation", str)
    flags = [k for k in ("flash_attention", "sdp_attention", "eager_attention", "flex_attention", "xformers_attention")
             if r.get(k, bool)]
    if len(flags) > 1:
        raise r.error("/".join(flags), "more than one attention implementation is on; choose one")
    if impl:
        attention_from_hf(r, "attn_implementation", impl)
    elif r.get("flash_attention", bool):
        attention_from_hf(r, "flash_attention", "flash_attention_2")
    elif r.get("eager_attention", bool):
        attention_from_hf(r, "eager_attention", "eager")
    elif r.get("flex_attention", bool):
        attention_from_hf(r, "flex_attention", "flex_attention")
    else:
        r.set("attention", "sdpa", "sdp_attention", r.get("sdp_attention", bool, "(transformers default sdpa)"))
    optimizer_from_hf(r, "optimizer", r.get("optimizer", str, "adamw_torch_fused"))
    if "optimizer" not in r.raw:
        m.rows[-1] = (m.rows[-1][0], "(axolotl default adamw_torch_fused)", m.rows[-1][2])

    # ---- kernels and loss (Liger / Cut Cross Entropy plugins, #11a's loss and liger fields)
    if r.get("cut_cross_entropy", bool):
        r.set_guarded("loss", "cce", "cut_cross_entropy", True,
                      absent="the loss without materialized logits; the estimate keeps the standard loss")
    elif r.get("liger_fused_linear_cross_entropy", bool):
        r.set_guarded("loss", "liger", "liger_fused_linear_cross_entropy", True,
                      absent="Liger's fused linear cross-entropy; the estimate keeps the standard loss")
    kernels = [k for k in ("liger_rms_norm", "liger_glu_activation", "liger_rope") if r.get(k, bool)]
    if kernels:
        r.set_guarded("liger", True, "+".join(kernels), True, absent="Liger's RMSNorm/SwiGLU/RoPE kernels")
    r.get("plugins", list)
    r.used.add("plugins")
    if r.has("plugins"):
        r.ignore("plugins", "the plugins' settings are read from their own keys")

    # ---- multi-GPU
    if deepspeed is not None:
        deepspeed_settings(r, "deepspeed", deepspeed)
    if fsdp_cfg:
        version = r.get("fsdp_version", int, None, where=fsdp_cfg, prefix="fsdp_config.") or \
            fsdp_cfg.get("version") or 1
        offload_params = fsdp_cfg.get("offload_params") or fsdp_cfg.get("fsdp_offload_params")
        reshard = fsdp_cfg.get("reshard_after_forward", True)
        multi_gpu(r, "fsdp_config", parallel="fsdp" if reshard is not False else "fsdp-grad-op",
                  fsdp_version=version, offload="params" if offload_params else "none", shown=fsdp_cfg)
    if r.has("fsdp"):
        r.get("fsdp", list)
        if not fsdp_cfg:
            multi_gpu(r, "fsdp", parallel="fsdp", shown=r.raw["fsdp"])
        else:
            r.ignore("fsdp", "deprecated list form; fsdp_config is read")
    return r.finish(REASONS, "not a memory setting memplan reads")


def _datasets(r: Reader) -> None:
    """The first training dataset: its local path, its prompt format and the text/messages field."""
    sets = r.get("datasets", list, [])
    r.get("chat_template", str)
    jinja = r.get("chat_template_jinja", str)
    if not sets:
        return
    first = sets[0]
    if not isinstance(first, dict):
        raise r.error("datasets[0]", f"expected a mapping with path and type, got {first!r}")
    kind = first.get("type")
    r.m.data["dataset"] = first.get("path")
    r.m.data["format"] = "chat" if kind in ("chat_template", "sharegpt") else (
        "alpaca" if isinstance(kind, str) and kind.startswith("alpaca") else "text")
    r.m.data["text_field"] = first.get("field") or first.get("field_messages") or (
        "messages" if r.m.data["format"] == "chat" else "text")
    if jinja:
        r.m.data["chat_template"] = jinja
    if len(sets) > 1:
        r.m.notes.append(f"{len(sets)} datasets: --dataset reads one file; give the largest or a merged file")
