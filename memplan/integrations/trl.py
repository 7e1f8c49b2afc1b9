"""TRL / transformers configs as JSON or YAML: TrainingArguments, SFTConfig, and the ModelConfig + ScriptArguments
keys that `trl sft --config FILE.yaml` reads into one file (trl/scripts/sft.py, TRL 1.16). Never the pickled
training_args.bin: save `training_args.to_dict()` as JSON instead.

What the stack does with them, where it changes memory (TRL 1.16, transformers 5.24, PEFT 0.21):
- SFTTrainer does not call prepare_model_for_kbit_training (trl/trainer/sft_trainer.py): upcast off; PEFT's
  get_peft_model keeps adapters in fp32 (autocast_adapter_dtype=True).
- ModelConfig: load_in_4bit/8bit, bnb_4bit_quant_type (nf4), use_bnb_nested_quant (false: no double
  quantization), use_peft (false), lora_r 16, lora_alpha 32, lora_dropout 0.05, lora_target_modules (PEFT's
  per-model default, q_proj+v_proj for Llama-style models, when absent).
- Defaults: per_device_train_batch_size 8, optim adamw_torch_fused; SFTConfig turns gradient_checkpointing on
  and bf16 on (unless fp16), max_length 1024; bare TrainingArguments have checkpointing and bf16 off.
"""
from __future__ import annotations

from memplan.integrations.config import (Key, Mapping, Reader, attention_from_hf, compute_dtype, dropout,
                                         lora_targets_from_names, optimizer_from_hf, positive, when_on)
from memplan.integrations.distributed import deepspeed_settings, fsdp_settings

NO_EFFECT = "no effect on per-step memory"
LOGGING = "logging / saving / evaluation: not the training step"
# TrainingArguments / SFTConfig / ModelConfig / ScriptArguments keys this reader knows (reads or ignores knowingly).
REASONS = {
    **{k: NO_EFFECT for k in (
        "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
        "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps",
        "seed", "data_seed", "tf32", "optim_args", "label_smoothing_factor", "dataloader_num_workers",
        "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor", "remove_unused_columns",
        "label_names", "ignore_data_skip", "disable_tqdm", "use_rslora", "model_revision", "lora_task_type",
        "completion_only_loss", "assistant_only_loss", "dataset_num_proc", "eos_token", "pad_token",
        "dataset_kwargs", "average_tokens_across_devices", "loss_type", "shuffle_dataset", "chat_template_path",
        "full_determinism", "use_cpu", "local_rank", "ddp_backend", "ddp_timeout", "ddp_find_unused_parameters",
        "dataset_config", "dataset_streaming", "dataset_test_split", "dataset_train_split", "trust_remote_code",
        "optim_target_modules", "torch_compile_backend", "torch_compile_mode", "use_cache", "neftune_noise_alpha",
        "debug", "skip_memory_metrics", "router_aux_loss_coef", "truncation_mode", "accelerator_config",
        "parallelism_config", "dataloader_multiprocessing_context", "dataloader_in_order", "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers", "ddp_static_graph", "log_level", "log_level_replica", "log_on_each_node",
        "logging_nan_inf_filter", "jit_mode_eval", "use_liger", "restore_callback_states_from_checkpoint",
        "enable_jit_checkpoint")},
    **{k: LOGGING for k in (
        "output_dir", "overwrite_output_dir", "logging_dir", "logging_steps", "logging_strategy",
        "logging_first_step", "save_steps", "save_strategy", "save_total_limit", "save_only_model",
        "save_safetensors", "eval_strategy", "eval_steps", "evaluation_strategy", "per_device_eval_batch_size",
        "eval_accumulation_steps", "do_train", "do_eval", "do_predict", "report_to", "run_name", "push_to_hub",
        "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "load_best_model_at_end",
        "metric_for_best_model", "greater_is_better", "resume_from_checkpoint", "eval_packing",
        "prediction_loss_only", "include_num_input_tokens_seen", "project", "trackio_space_id", "bf16_full_eval",
        "fp16_full_eval", "trackio_bucket_id", "trackio_static_space_id", "eval_delay", "eval_on_start",
        "eval_do_concat_batches", "eval_use_gather_object", "include_for_metrics", "batch_eval_metrics",
        "save_on_each_node", "hub_always_push", "hub_revision")},
    "torch_empty_cache_steps": "empties the allocator cache every N steps: lowers reserved, not the tensor peak",
    "gradient_accumulation_steps": "gradients accumulate into the same buffers: no effect on per-step memory",
    "dataset_name": "a hub dataset: memplan never downloads; pass the file with --dataset",
    "torch_compile": "compiled kernels are not modelled (the estimate is for eager mode)",
    "auto_find_batch_size": "halves the batch after an OOM: plan the batch with `memplan fit`",
    "dataloader_drop_last": NO_EFFECT, "length_column_name": NO_EFFECT, "lora_target_parameters": "not modelled",
}
SFT_ONLY = ("max_length", "max_seq_length", "packing", "packing_strategy", "padding_free", "dataset_text_field",
            "completion_only_loss", "assistant_only_loss", "activation_offloading", "model_name_or_path",
            "model_init_kwargs", "use_peft", "load_in_4bit", "load_in_8bit", "lora_r", "dataset_name")
READ = ("liger_kernel_config", "per_device_train_batch_size", "gradient_checkpointing", "gradient_checkpointing_kwargs", "optim", "bf16",
        "fp16", "group_by_length", "train_sampling_strategy", "deepspeed", "fsdp", "fsdp_config", "use_liger_kernel",
        "dtype", "torch_dtype", "attn_implementation", "bnb_4bit_quant_type", "use_bnb_nested_quant",
        "bnb_4bit_quant_storage", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
        "use_dora", "pad_to_multiple_of")
MODEL_CONFIG = ("model_name_or_path", "dtype", "torch_dtype", "use_peft", "load_in_4bit", "load_in_8bit", "lora_r",
                "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "use_dora",
                "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")
KNOWN_KEYS = set(REASONS) | set(SFT_ONLY) | set(READ)
DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
          "float32": "fp32", "fp32": "fp32", "float": "fp32", "auto": None}

LORA = (Key("lora_r", "lora_r", positive, 16, origin="(TRL default 16)"),
        Key("lora_alpha", "lora_alpha", positive, 32, origin="(TRL default 32)"),
        Key("lora_dropout", "lora_dropout", dropout, 0.05, origin="(TRL default 0.05)"),
        Key("use_dora", "dora", when_on(True)))
BATCH = (Key("per_device_train_batch_size", "batch_size", positive, 8, origin="(transformers default 8)"),)
# SFTConfig.activation_offloading: trl/models/activation_offloading.py OffloadActivations around the step
OFFLOAD = (Key("activation_offloading", "activation_offload", when_on("all"),
               why="TRL's OffloadActivations: every saved tensor to host RAM"),)


def read(r: Reader) -> Mapping:
    m = r.m
    sft = any(k in r.raw for k in SFT_ONLY)
    kind = "SFTConfig" if sft else "TrainingArguments"
    model = r.get("model_name_or_path", str)
    if model:
        m.model, m.model_key = model, "model_name_or_path"
        m.data["tokenizer"] = model

    # ---- precision and weights
    bf16, fp16 = r.get("bf16", bool), r.get("fp16", bool)
    shown = None
    if bf16 is None and sft and not fp16:
        bf16, shown = True, "(SFTConfig default: on unless fp16)"  # SFTConfig.__post_init__: bf16 = not fp16
    compute_dtype(r, bf16, fp16, shown=shown)
    four, eight = r.get("load_in_4bit", bool, False), r.get("load_in_8bit", bool, False)
    if four and eight:
        raise r.error("load_in_4bit/load_in_8bit", "4-bit and 8-bit are both on; choose one")
    init = r.get("model_init_kwargs", dict, {})
    dkey = "dtype" if r.has("dtype") else "torch_dtype" if r.has("torch_dtype") else None
    raw_dtype = r.get(dkey, str) if dkey else (init.get("dtype") or init.get("torch_dtype"))
    if raw_dtype is not None and str(raw_dtype).replace("torch.", "") not in DTYPES:
        raise r.error(dkey or "model_init_kwargs.dtype", f"unknown dtype {raw_dtype!r}")
    load = DTYPES.get(str(raw_dtype).replace("torch.", "")) if raw_dtype else None
    use_peft = r.get("use_peft", bool, False)
    if not any(k in r.raw for k in MODEL_CONFIG):
        m.notes.append(f"{kind} alone does not say how the model is loaded or whether LoRA is used (the model and "
                       "peft_config are passed to the trainer): bits, method and LoRA come from the flags or "
                       "memplan's defaults")
        _shapes_and_rest(r, m, sft, kind, init)
        return r.finish(REASONS, "not a TrainingArguments / SFTConfig / ModelConfig key memplan knows")
    if (four or eight) and not use_peft:
        raise r.error("load_in_4bit" if four else "load_in_8bit",
                      "quantized weights are frozen: set use_peft: true (LoRA)")
    if four:
        r.set("bits", 4, "load_in_4bit", True)
        qt = r.get("bnb_4bit_quant_type", str, "nf4")
        if qt not in ("nf4", "fp4"):
            raise r.error("bnb_4bit_quant_type", f"expected nf4 or fp4, got {qt!r}")
        r.set("quant_type", qt, "bnb_4bit_quant_type", r.raw.get("bnb_4bit_quant_type", "(default nf4)"))
        dq = r.get("use_bnb_nested_quant", bool, False)
        r.set("double_quant", dq, "use_bnb_nested_quant", r.raw.get("use_bnb_nested_quant", "(TRL default false)"))
        if r.has("bnb_4bit_quant_storage"):
            qs = r.get("bnb_4bit_quant_storage", str).replace("torch.", "")
            if qs not in ("uint8", *DTYPES) or DTYPES.get(qs, "uint8") is None:
                raise r.error("bnb_4bit_quant_storage", f"expected uint8, bfloat16, float16 or float32, got {qs!r}")
            r.set("quant_storage", DTYPES.get(qs, qs), "bnb_4bit_quant_storage", qs,
                  "the packed 4-bit bytes' dtype: what FSDP / ZeRO-3 shard")
        if load:
            r.set("compute_dtype", load, dkey or "model_init_kwargs.dtype", raw_dtype,
                  "bnb_4bit_compute_dtype = ModelConfig.dtype")
    elif eight:
        r.set("bits", 8, "load_in_8bit", True)
    elif load:
        r.set("bits", 32 if load == "fp32" else 16, dkey or "model_init_kwargs.dtype", raw_dtype,
              "weights in this dtype")
    else:
        bits = 16 if m.settings.get("compute_dtype") in ("bf16", "fp16") else 32
        r.set("bits", bits, "bf16/fp16", bf16 if bf16 is not None else fp16,
              "no dtype given: weights assumed in the mixed-precision dtype")
    r.set("method", "lora" if use_peft else "full", "use_peft", r.raw.get("use_peft", "(default false)"))
    if four or eight:
        r.set("upcast", False, "load_in_4bit" if four else "load_in_8bit", True,
              "SFTTrainer does not call prepare_model_for_kbit_training")

    # ---- LoRA (ModelConfig)
    if use_peft:
        r.apply(LORA)
        names = r.get("lora_target_modules", (list, str))
        if isinstance(names, str):
            names = [names]
        if names:
            lora_targets_from_names(r, "lora_target_modules", names)
        else:
            r.set("lora_targets", "qv", "lora_target_modules", "(unset)",
                  "PEFT's default for Llama-style models: q_proj+v_proj")
        save = r.get("lora_modules_to_save", list)
        if save:
            r.set("modules_to_save", tuple(save), "lora_modules_to_save", save)

    _shapes_and_rest(r, m, sft, kind, init)
    return r.finish(REASONS, "not a TrainingArguments / SFTConfig / ModelConfig key memplan knows")


FUSED_LOSS = ("SFTTrainer (TRL 1.16) computes the loss through its fused LM head (trl/trainer/utils.py "
              "add_fused_lm_head: log-probs in tiles of 32768 vocabulary columns, no b·s·V logits); memplan models "
              "the standard loss, whose logits term is higher for a large vocabulary")


def _shapes_and_rest(r: Reader, m: Mapping, sft: bool, kind: str, init: dict) -> None:
    if sft:
        m.notes.append(FUSED_LOSS)
    # ---- shapes
    r.apply(BATCH)
    key = "max_length" if r.has("max_length") else "max_seq_length"
    r.get("max_seq_length", int)
    if sft:
        seq = r.positive(key, 1024)
        r.set("seq_len", seq, key, r.raw.get(key, "(SFTConfig default 1024)"),
              "the longest step; --dataset gives each step's length")
        m.data["max_length"] = seq
    else:
        m.notes.append("TrainingArguments have no maximum length: the sequence length comes from --seq-len, "
                       "--dataset or memplan's default")
    packing = r.get("packing", bool, False)
    strategy = r.get("packing_strategy", str, "bfd")
    padding_free = r.get("padding_free", bool, False)
    order = r.get("train_sampling_strategy", str, "random")
    if r.get("group_by_length", bool, False):
        order = "group_by_length"
    if order not in ("random", "sequential", "group_by_length"):
        r.not_modelled("train_sampling_strategy", f"{order!r}: steps are simulated in random order", order)
        order = "random"
    m.data.update(packing=packing, packing_strategy=strategy, padding_free=padding_free or (packing and
                  strategy == "bfd"), order={"random": "shuffled"}.get(order, order),
                  text_field=r.get("dataset_text_field", str, "text"), too_long="truncate")
    r.get("pad_to_multiple_of", (int, str))
    if isinstance(r.raw.get("pad_to_multiple_of"), int):
        m.data["pad_to_multiple_of"] = r.raw["pad_to_multiple_of"]

    # ---- checkpointing, attention, optimizer, kernels
    gc = r.get("gradient_checkpointing", bool)
    ac = r.get("activation_checkpointing", bool)  # transformers 5's name for it
    gkey = "gradient_checkpointing"
    if gc is None and ac is not None:
        gc, gkey = ac, "activation_checkpointing"
    if gc is None:
        gc = sft
        shown = f"({kind} default {'true' if sft else 'false'})"
    else:
        shown = gc
    r.set("gradient_checkpointing", gc, gkey, shown)
    kw = r.get("gradient_checkpointing_kwargs", dict) or r.get("activation_checkpointing_kwargs", dict) or {}
    if kw.get("use_reentrant") is True:
        m.notes.append("use_reentrant: true keeps the same layer inputs; memplan models non-reentrant checkpointing")
    r.apply(OFFLOAD)
    impl = r.get("attn_implementation", str) or init.get("attn_implementation")
    if impl:
        attention_from_hf(r, "attn_implementation" if r.has("attn_implementation") else
                          "model_init_kwargs.attn_implementation", impl)
    optimizer_from_hf(r, "optim", r.get("optim", str, "adamw_torch_fused"))
    if "optim" not in r.raw:
        m.rows[-1] = (m.rows[-1][0], "(transformers default adamw_torch_fused)", m.rows[-1][2])
    if r.get("use_liger_kernel", bool, False):
        _liger(r, sft)

    # ---- multi-GPU (the GPU count is the launcher's: --gpus)
    ds = r.get("deepspeed", (str, dict))
    fsdp = r.get("fsdp", (str, list, bool))
    fcfg = r.get("fsdp_config", (dict, str), {}) or {}
    if isinstance(fcfg, str):
        r.not_modelled("fsdp_config", "an fsdp_config file path is not read; put its keys inline", fcfg)
        fcfg = {}
    if ds is not None and fsdp not in (None, False, "", []):
        raise r.error("deepspeed/fsdp", "DeepSpeed and FSDP are both set; choose one")
    if ds is not None:
        deepspeed_settings(r, "deepspeed", ds)
    elif fsdp not in (None, False, "", []):
        # transformers 5.24: fsdp_config "version" defaults to 2 (FSDP1 is deprecated)
        fsdp_settings(r, "fsdp", fsdp, fcfg, default_version=2)


def _liger(r: Reader, sft: bool) -> None:
    """use_liger_kernel: transformers' Trainer applies liger_kernel's _apply_liger_kernel_to_instance with
    liger_kernel_config (apply_liger_kernel_to_llama's defaults: rope, swiglu, rms_norm and the fused linear
    cross-entropy on). TRL 1.16's SFTTrainer turns the fused linear cross-entropy off (its own fused LM head
    computes the loss; sft_trainer.py) and keeps the layer kernels."""
    cfg = r.get("liger_kernel_config", dict, {}) or {}
    if any(cfg.get(k, True) is not False for k in ("rope", "swiglu", "rms_norm", "geglu", "layer_norm")):
        r.set("liger", True, "use_liger_kernel", True, "Liger's layer kernels: RoPE, RMSNorm, SwiGLU / GeGLU")
    if sft:
        r.m.notes.append("use_liger_kernel under SFTTrainer: the layer kernels only; TRL turns Liger's fused linear "
                         "cross-entropy off (its fused LM head computes the loss)")
    elif cfg.get("fused_linear_cross_entropy", True) is not False:
        r.set("loss", "liger", "use_liger_kernel", True, "Liger's fused linear cross-entropy (no b·s·V logits)")
    elif cfg.get("cross_entropy"):
        r.not_modelled("liger_kernel_config", "Liger's (unfused) cross-entropy still takes the b·s·V logits: the "
                                              "estimate keeps the standard loss", cfg)
