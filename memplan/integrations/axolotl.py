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

from memplan.integrations.config import (Key, Mapping, Reader, attention_from_hf, compute_dtype, dropout,
                                         lora_targets_from_names, optimizer_from_hf, positive, when_on)
from memplan.integrations.distributed import deepspeed_settings, fsdp_settings

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


LORA = (Key("lora_r", "lora_r", positive, 8, origin="(PEFT default 8)"),
        Key("lora_alpha", "lora_alpha", positive, 8, origin="(PEFT default 8)"),
        Key("lora_dropout", "lora_dropout", dropout, 0.0, origin="(axolotl default 0.0)"),
        Key("peft_use_dora", "dora", when_on(True)))
SHAPES = (Key("sequence_len", "seq_len", positive, 512, "the longest step; --dataset gives each step's length",
              "(axolotl default 512)"),
          Key("micro_batch_size", "batch_size", positive, 1, origin="(axolotl default 1)"))
# Plugins (axolotl/integrations/*): their keys join the schema, and act, only when the plugin is listed.
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
LIGER_KERNELS = ("liger_rms_norm", "liger_glu_activation", "liger_swiglu", "liger_rope", "liger_layer_norm")
LIGER_LOSS = (Key("liger_fused_linear_cross_entropy", "loss", when_on("liger"),
                  why="Liger's fused linear cross-entropy (LigerPlugin: no b·s·V logits)"),)
CCE_LOSS = (Key("cut_cross_entropy", "loss", when_on("cce"), why="Cut Cross-Entropy (CutCrossEntropyPlugin)"),)


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
        if qs not in storage:
            raise r.error("bnb_config_kwargs.bnb_4bit_quant_storage", f"expected one of {', '.join(storage)}, got {qs!r}")
        r.set("quant_storage", storage[qs], "bnb_config_kwargs.bnb_4bit_quant_storage",
              qs if "bnb_4bit_quant_storage" in bnb else "(axolotl default bfloat16)",
              "the packed 4-bit bytes' dtype: what FSDP / ZeRO-3 shard")
    deepspeed, fsdp_cfg = r.get("deepspeed", (str, dict)), r.get("fsdp_config", dict)
    if r.get("embeddings_skip_upcast", bool):
        r.not_modelled("embeddings_skip_upcast", "axolotl's patched upcast keeps embed_tokens/lm_head 16-bit; "
                                                 "memplan models PEFT's upcast of every non-quantized weight")

    # ---- LoRA
    if adapter:
        r.apply(LORA)
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
        if r.get("peft_autocast_adapter_dtype", bool) is False:
            r.set("lora_dtype", m.settings.get("compute_dtype", "fp32"), "peft_autocast_adapter_dtype", False,
                  "adapters stay in the base dtype")

    # ---- shapes
    seq = r.apply(SHAPES)["seq_len"]
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
    offload = r.get("activation_offloading", (bool, str), False)
    if offload not in (True, False, "legacy"):
        raise r.error("activation_offloading", f"expected true, false or legacy, got {offload!r}")
    if gc == "offload":
        # axolotl/monkeypatch/gradient_checkpointing (Unsloth-style): each checkpointed layer input to pinned host
        r.set("activation_offload", "checkpoints", "gradient_checkpointing", gc,
              "the checkpointed layer inputs go to host RAM (axolotl's CPU-offloaded checkpointing)")
    elif gc == "offload_disk":
        r.not_modelled("gradient_checkpointing", "checkpoints offloaded to disk: the estimate keeps them on the GPU")
    if offload:
        if gc == "offload":
            m.notes.append("gradient_checkpointing: offload and activation_offloading are both set: the estimate "
                           "follows activation_offloading")
        legacy = offload == "legacy"
        r.set("activation_offload", "checkpoints" if legacy else "all", "activation_offloading", offload,
              "legacy: the checkpointed layer inputs to host RAM" if legacy else
              "TRL's OffloadActivations: every saved tensor to host RAM")
    kw = r.get("gradient_checkpointing_kwargs", dict, {})
    if kw.get("use_reentrant") is True:
        m.notes.append("use_reentrant: true keeps the same layer inputs; memplan models non-reentrant checkpointing")
    impl = r.get("attn_implementation", str)
    flags = [k for k in ("flash_attention", "sdp_attention", "eager_attention", "flex_attention", "xformers_attention")
             if r.get(k, bool)]
    if len(flags) > 1:
        raise r.error("/".join(flags), "more than one attention implementation is on; choose one")
    if impl:
        attention_from_hf(r, "attn_implementation", impl)
    elif r.get("flash_attention", bool):
        attention_from_hf(r, "flash_attention", "flash_attention_2", True)
    elif r.get("eager_attention", bool):
        attention_from_hf(r, "eager_attention", "eager", True)
    elif r.get("flex_attention", bool):
        attention_from_hf(r, "flex_attention", "flex_attention")
    else:
        r.set("attention", "sdpa", "sdp_attention", r.get("sdp_attention", bool, "(transformers default sdpa)"))
    optimizer_from_hf(r, "optimizer", r.get("optimizer", str, "adamw_torch_fused"))
    if "optimizer" not in r.raw:
        m.rows[-1] = (m.rows[-1][0], "(axolotl default adamw_torch_fused)", m.rows[-1][2])

    # ---- kernels and loss: Liger and Cut Cross-Entropy plugins
    plugins = r.get("plugins", list, [])
    liger_keys = [k for k in (*LIGER_KERNELS, "liger_fused_linear_cross_entropy", "liger_cross_entropy")
                  if r.has(k)]
    if LIGER_PLUGIN in plugins:
        kernels = [k for k in LIGER_KERNELS if r.get(k, bool)]
        for k in LIGER_KERNELS:
            r.get(k, bool)
        if kernels:
            r.set("liger", True, "+".join(kernels), True, "Liger's RMSNorm / SwiGLU / RoPE kernels (LigerPlugin)")
        r.apply(LIGER_LOSS)
        if r.get("liger_cross_entropy", bool):
            r.not_modelled("liger_cross_entropy", "Liger's (unfused) cross-entropy still takes the b·s·V logits: "
                                                  "the estimate keeps the standard loss", True)
    else:
        for k in liger_keys:
            r.ignore(k, f"takes effect only with plugins: [{LIGER_PLUGIN}]")
    if CCE_PLUGIN in plugins:
        if "loss" in m.settings and r.get("cut_cross_entropy", bool):
            raise r.error("cut_cross_entropy", "Liger's fused linear cross-entropy is on too; choose one")
        r.apply(CCE_LOSS)
    elif r.has("cut_cross_entropy"):
        r.ignore("cut_cross_entropy", f"takes effect only with plugins: [{CCE_PLUGIN}]")
    other = [p for p in plugins if p not in (LIGER_PLUGIN, CCE_PLUGIN)]
    if other:
        r.not_modelled("plugins", f"plugins not modelled: {', '.join(map(str, other))}", other)

    # ---- multi-GPU (the GPU count is the launcher's: --gpus)
    if deepspeed is not None:
        if fsdp_cfg or r.has("fsdp"):
            raise r.error("deepspeed/fsdp", "DeepSpeed and FSDP are both set; choose one")
        deepspeed_settings(r, "deepspeed", deepspeed)
    version = r.get("fsdp_version", int)
    if fsdp_cfg or r.has("fsdp"):
        options = r.get("fsdp", list)
        cfg = dict(fsdp_cfg or {})
        if version is not None:
            cfg.setdefault("fsdp_version", version)
        fsdp_settings(r, "fsdp_config" if fsdp_cfg else "fsdp", options, cfg, default_version=1)
    if adapter and (four or eight):
        parallel = m.settings.get("parallel")
        skip = (four and parallel in ("fsdp", "fsdp-grad-op")) or parallel == "zero3"
        r.set("upcast", not skip, "adapter", adapter,
              "axolotl skips prepare_model_for_kbit_training under FSDP-QLoRA / ZeRO-3" if skip else
              "axolotl calls PEFT prepare_model_for_kbit_training on 4/8-bit weights")
    for k in ("tensor_parallel_size", "context_parallel_size", "dp_replicate_size"):
        if (r.get(k, int) or 1) > 1:
            r.not_modelled(k, "tensor / context / replicated parallelism is not modelled (memplan models data "
                              "parallelism: DDP, FSDP, ZeRO)")
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
