"""LLaMA-Factory YAML configs (`llamafactory-cli train FILE.yaml`; schema: llamafactory/hparams/{model,data,
finetuning}_args.py plus transformers' TrainingArguments, LLaMA-Factory 0.9.5; examples/train_qlora/*.yaml).

What LLaMA-Factory does with them, where it changes memory (llamafactory/model/, v0.9.5):
- quantization_bit 4|8 loads BitsAndBytesConfig (quantization_type nf4, double_quantization true by default);
  it never calls PEFT's prepare_model_for_kbit_training (upcast off): model_utils/checkpointing.py
  prepare_model_for_training only casts layer norms to fp32 with upcast_layernorm.
- adapter.py casts trainable parameters (the LoRA adapters) to fp32 unless pure_bf16.
- gradient checkpointing is on unless disable_gradient_checkpointing, reentrant unless use_reentrant_gc: false.
- flash_attn auto leaves transformers' default (sdpa), disabled is eager, fa2 FlashAttention-2.
- defaults that differ from memplan's: lora_rank 8, lora_alpha 2 x rank, lora_dropout 0, lora_target all,
  cutoff_len 2048, per_device_train_batch_size 8 (transformers), optim adamw_torch_fused (transformers 5).
"""
from __future__ import annotations

from memplan.integrations.config import (Key, Mapping, Reader, compute_dtype, dropout, optimizer_from_hf, positive,
                                         when_on)
from memplan.integrations.distributed import deepspeed_settings
from memplan.integrations.trl import REASONS as HF_REASONS

REASONS = {
    **HF_REASONS,
    "template": "the chat template: used by --dataset (give the tokenizer folder whose template matches)",
    "dataset": "dataset names from dataset_info.json: pass the file with --dataset",
    "dataset_dir": "pass the file with --dataset", "eval_dataset": "evaluation only", "val_size": "evaluation only",
    "overwrite_cache": "no effect on per-step memory", "preprocessing_num_workers": "no effect on per-step memory",
    "max_samples": "fewer rows: --dataset reads the file", "plot_loss": "logging", "ddp_timeout": "no effect",
    "trust_remote_code": "pass --trust-remote-code to memplan itself", "train_on_prompt": "no effect on memory",
    "mask_history": "no effect on memory", "resize_vocab": "not modelled", "use_rslora": "rsLoRA changes the scale",
    "pissa_init": "same adapter shapes", "loraplus_lr_ratio": "no effect on memory",
    "create_new_adapter": "same adapter shapes", "adapter_name_or_path": "resumed adapters: same bytes",
    "print_param_status": "logging",
}

LORA = (Key("lora_rank", "lora_r", positive, 8, origin="(default 8)"),
        Key("lora_alpha", "lora_alpha", positive, lambda s: 2 * s["lora_r"], origin="(default 2 x lora_rank)"),
        Key("lora_dropout", "lora_dropout", dropout, 0.0, origin="(default 0)"),
        Key("use_dora", "dora", when_on(True)))
SHAPES = (Key("cutoff_len", "seq_len", positive, 2048, "the longest step; --dataset gives each step's length",
              "(default 2048)"),
          Key("per_device_train_batch_size", "batch_size", positive, 8, origin="(transformers default 8)"))
# liger_kernel.py apply_liger_kernel (LLaMA-Factory 0.9.5): the model's RMSNorm / SwiGLU / RoPE and, for training,
# the fused linear cross-entropy (require_logits is false for SFT).
LIGER = (Key("enable_liger_kernel", "liger", when_on(True), why="Liger's RMSNorm / SwiGLU / RoPE kernels"),
         Key("enable_liger_kernel", "loss", when_on("liger"), why="Liger's fused linear cross-entropy"))


def read(r: Reader) -> Mapping:
    m = r.m
    model = r.get("model_name_or_path", str)
    m.model, m.model_key = model, "model_name_or_path"
    m.data["tokenizer"] = model
    stage = r.get("stage", str, "sft")
    if stage not in ("sft", "pt"):
        r.not_modelled("stage", f"{stage}: memplan models one model's SFT step (a reference / reward model and "
                                "the preference batch are not counted)", stage)

    # ---- precision, weights, method
    pure = r.get("pure_bf16", bool, False)
    bf16, fp16 = r.get("bf16", bool), r.get("fp16", bool)
    compute_dtype(r, True if pure else bf16, fp16, bf16_key="pure_bf16" if pure else "bf16")
    method = r.get("finetuning_type", str, "lora")
    if method not in ("lora", "full", "freeze", "oft"):
        raise r.error("finetuning_type", f"unknown finetuning type {method!r}; LLaMA-Factory has lora, oft, "
                      "freeze and full")
    if method in ("freeze", "oft"):
        r.not_modelled("finetuning_type", f"{method} tuning is not modelled (memplan models lora and full)", method)
        r.defer("method", "finetuning_type", f"{method} tuning is not modelled by memplan; pass --method lora|full")
    else:
        r.set("method", method, "finetuning_type", r.raw.get("finetuning_type", "(default lora)"))
    bits = r.get("quantization_bit", int)
    qmethod = r.get("quantization_method", str, "bnb")
    if bits is not None:
        if bits not in (4, 8):
            raise r.error("quantization_bit", f"expected 4 or 8 (bitsandbytes), got {bits}")
        if method == "full":
            raise r.error("quantization_bit", "quantized weights are frozen: finetuning_type full needs 16-bit "
                                              "weights (drop quantization_bit)")
        if qmethod != "bnb":
            r.not_modelled("quantization_method", f"{qmethod}: memplan models bitsandbytes only", qmethod)
            r.defer("bits", "quantization_method", f"quantization method {qmethod!r} is not modelled (memplan "
                    "models bitsandbytes, quantization_method: bnb); pass --bits to estimate a bnb equivalent")
        r.set("bits", bits, "quantization_bit", bits)
        if bits == 4:
            qt = r.get("quantization_type", str, "nf4")
            if qt not in ("nf4", "fp4"):
                raise r.error("quantization_type", f"expected nf4 or fp4, got {qt!r}")
            r.set("quant_type", qt, "quantization_type", r.raw.get("quantization_type", "(default nf4)"))
            r.set("double_quant", r.get("double_quantization", bool, True), "double_quantization",
                  r.raw.get("double_quantization", "(default true)"))
        r.set("upcast", False, "quantization_bit", bits, "LLaMA-Factory never calls prepare_model_for_kbit_training")
    else:
        dt = m.settings.get("compute_dtype")
        r.set("bits", 16 if dt in ("bf16", "fp16") else 32, "bf16/fp16", bf16 if bf16 is not None else fp16,
              "weights in the compute dtype")
    if r.get("upcast_layernorm", bool, False):
        m.notes.append("upcast_layernorm: norm weights in fp32 (a few MiB; not modelled)")
    r.get("upcast_lmhead_output", bool)
    if r.raw.get("upcast_lmhead_output"):
        r.not_modelled("upcast_lmhead_output", "an fp32 copy of the logits (modelled only with upcast on)")

    # ---- LoRA
    if method == "lora":
        r.apply(LORA)
        target = r.get("lora_target", str, "all")
        names = [t.strip() for t in target.split(",") if t.strip()]
        if names == ["all"]:
            r.set("lora_targets", "all-linear", "lora_target", target,
                  "every linear but the output layer (find_all_linear_modules)")
        elif not names:
            raise r.error("lora_target", "empty")
        else:
            r.set("lora_targets", tuple(names), "lora_target", target, "checked against the model's linear names")
        extra = r.get("additional_target", str)
        if extra:
            r.set("modules_to_save", tuple(t.strip() for t in extra.split(",") if t.strip()), "additional_target",
                  extra)
        r.set("lora_dtype", m.settings.get("compute_dtype", "fp32") if pure else "fp32",
              "pure_bf16" if pure else "finetuning_type", pure if pure else method,
              "pure_bf16 keeps adapters 16-bit" if pure else "adapter.py casts trainable parameters to fp32")

    # ---- shapes
    cutoff = r.apply(SHAPES)["seq_len"]
    packing = bool(r.get("packing", bool, False) or r.get("neat_packing", bool, False))
    order = "group_by_length" if r.get("group_by_length", bool, False) else \
        {"random": "shuffled"}.get(r.get("train_sampling_strategy", str, "random"), "shuffled")
    m.data.update(packing=packing, max_length=cutoff, too_long="truncate", order=order, format="chat")
    r.get("template", str)

    # ---- checkpointing, attention, optimizer, kernels
    off = r.get("disable_gradient_checkpointing", bool, False)
    r.set("gradient_checkpointing", not off, "disable_gradient_checkpointing",
          r.raw.get("disable_gradient_checkpointing", "(default false)"))
    if not off and r.get("use_reentrant_gc", bool, True):
        m.notes.append("LLaMA-Factory checkpoints reentrant by default (use_reentrant_gc); it keeps the same layer "
                       "inputs as the non-reentrant checkpointing memplan models")
    if r.get("use_unsloth_gc", bool, False):
        if off:
            raise r.error("use_unsloth_gc", "Unsloth's checkpointing is checkpointing: "
                          "disable_gradient_checkpointing is true")
        r.set("activation_offload", "checkpoints", "use_unsloth_gc", True,
              "Unsloth's checkpointing: each checkpointed layer input to host RAM")
    fa = r.get("flash_attn", str, "auto")
    table = {"auto": "sdpa", "sdpa": "sdpa", "disabled": "eager", "fa2": "flash_attention_2"}
    if fa not in table and fa != "fa3":
        raise r.error("flash_attn", f"expected auto, disabled, sdpa, fa2 or fa3, got {fa!r}")
    if fa == "fa2":
        r.set("attention", "flash_attention_2", "flash_attn", fa, "attn_implementation flash_attention_2 "
              "(llamafactory/model/model_utils/attention.py)")
    elif fa == "fa3":
        r.not_modelled("flash_attn", "FlashAttention-3: the estimate uses sdpa (O(s) fused kernels)", fa)
    else:
        r.set("attention", table[fa], "flash_attn", r.raw.get("flash_attn", "(default auto: transformers' sdpa)"))
    optimizer_from_hf(r, "optim", r.get("optim", str, "adamw_torch_fused"))
    if "optim" not in r.raw:
        m.rows[-1] = (m.rows[-1][0], "(transformers default adamw_torch_fused)", m.rows[-1][2])
    r.apply(LIGER)
    for k in ("use_unsloth", "use_galore", "use_apollo", "use_badam", "shift_attn"):
        if r.get(k, bool, False):
            r.not_modelled(k, "not modelled by memplan")

    # ---- multi-GPU (the GPU count is the launcher's: --gpus; FSDP comes from an accelerate config, not this file)
    ds = r.get("deepspeed", (str, dict))
    if ds is not None:
        deepspeed_settings(r, "deepspeed", ds)
    return r.finish(REASONS, "not a LLaMA-Factory / TrainingArguments key memplan reads")
