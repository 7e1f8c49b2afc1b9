"""The training flags shared by estimate, trace, profile, fit, gpus and sweep, and the grid they expand to.

Every numeric or choice flag takes comma-separated values; the grid is their cartesian product, in flag order.
Lists inside one value (LoRA target modules, modules_to_save) are joined with '+': `--lora-targets q_proj+v_proj`.
"""
from __future__ import annotations

import argparse
import itertools

from memplan.errors import MemplanError
from memplan.spec import TrainSpec

_ON = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise MemplanError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise MemplanError(f"expected a number, got {text!r}") from None


def _bool(text: str) -> bool:
    if text.lower() not in _ON:
        raise MemplanError(f"expected on or off, got {text!r}")
    return _ON[text.lower()]


def _str(text: str) -> str:
    return text.strip().lower()


def _plus_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split("+") if t.strip() and t.strip() != "none")


# (flag, TrainSpec field, parser, metavar/help). One row per flag; the help text says the default.
FLAGS = [
    ("--bits", "bits", _int, "base weight bits: 4 (NF4/FP4), 8 (LLM.int8), 16, 32"),
    ("--quant-type", "quant_type", _str, "4-bit data type: nf4 | fp4"),
    ("--double-quant", "double_quant", _bool, "double quantization of the 4-bit absmax: on | off"),
    ("--compute-dtype", "compute_dtype", _str, "compute / 16-bit weight dtype: bf16 | fp16 | fp32"),
    ("--method", "method", _str, "lora (LoRA on the frozen base; QLoRA with --bits 4) | full (full fine-tuning)"),
    ("--upcast", "upcast", _bool, "PEFT prepare_model_for_kbit_training casts non-quantized weights to fp32: on | off"),
    ("--lora-r", "lora_r", _int, "LoRA rank"),
    ("--lora-alpha", "lora_alpha", _int, "LoRA alpha (no memory effect; recorded)"),
    ("--lora-dropout", "lora_dropout", _float, "LoRA dropout probability (>0 keeps a dropped copy of each input)"),
    ("--lora-targets", "lora_targets", _str, "qv | attn | all-linear | module names joined by '+' (q_proj+v_proj)"),
    ("--lora-dtype", "lora_dtype", _str, "adapter dtype: fp32 (PEFT default autocast) | bf16 | fp16"),
    ("--dora", "dora", _bool, "DoRA (weight-decomposed LoRA): on | off"),
    ("--optimizer", "optimizer", _str, "adamw | adamw-8bit | paged-adamw | paged-adamw-8bit | sgd | adafactor"),
    ("--batch-size", "batch_size", _int, "micro-batch size (sequences per step)"),
    ("--seq-len", "seq_len", _int, "tokens per sequence"),
    ("--checkpointing", "gradient_checkpointing", _bool, "gradient checkpointing: on | off"),
    ("--attention", "attention", _str, "sdpa (fused flash / memory-efficient kernels) | eager (materialized scores)"),
    ("--modules-to-save", "modules_to_save", _plus_list, "fully trained modules joined by '+' (lm_head+embed_tokens)"),
    ("--gpus", "gpus", _int, "data-parallel ranks (GPUs); memory is per rank"),
    ("--parallel", "parallel", _str, "auto (none on 1 GPU, fsdp on more) | ddp | fsdp (FULL_SHARD) | fsdp-grad-op "
                                     "(SHARD_GRAD_OP) | zero1 | zero2 | zero3 (DeepSpeed)"),
    ("--fsdp-version", "fsdp_version", _int, "torch FSDP 1 (FlatParameter) | 2 (fully_shard, per-parameter shards)"),
    ("--offload", "offload", _str, "none | optimizer (ZeRO-Offload) | params (FSDP CPUOffload, ZeRO-3 offload_param)"),
    ("--quant-storage", "quant_storage", _str, "bnb_4bit_quant_storage: auto (uint8; the compute dtype when FSDP or "
                                               "ZeRO-3 shards 4-bit weights) | uint8 | bf16 | fp16 | fp32"),
    ("--transformers", "transformers", _int, "transformers major version whose behaviour to model: 4 | 5 (MoE experts "
     "are quantized nn.Linear under 4); trace and profile run the installed one"),
]
_ALIASES = {"--bits": ["-q"], "--lora-r": ["-r"], "--batch-size": ["-b"], "--seq-len": ["-s"],
            "--checkpointing": ["--gradient-checkpointing", "--ckpt"]}


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    defaults = TrainSpec()
    group = parser.add_argument_group("training settings (comma-separated values make a grid)")
    for flag, field_name, _, text in FLAGS:
        default = getattr(defaults, field_name)
        shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
        if isinstance(shown, tuple):
            shown = "+".join(shown) or "none"
        if field_name == "transformers":
            shown = f"the installed one, {shown}"
        group.add_argument(flag, *_ALIASES.get(flag, []), dest=field_name, default=None, metavar="V",
                           help=f"{text} (default: {shown})")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="accept a config.json that asks for remote code (auto_map): memplan reads its fields, and "
                             "only with this flag lets transformers (profile) run the model's own code")


def model_from_args(args: argparse.Namespace, ref: str | None = None):
    """The ModelSpec the command's MODEL argument (or `ref`) names, honouring --trust-remote-code."""
    from memplan.catalog import resolve_model

    return resolve_model(ref if ref is not None else args.model,
                         trust_remote_code=getattr(args, "trust_remote_code", False))


def grid_from_args(args: argparse.Namespace, **fixed) -> list[TrainSpec]:
    """The TrainSpecs that the flags describe: one per combination of the comma-separated values."""
    axes = []
    for flag, field_name, parse, _ in FLAGS:
        raw = getattr(args, field_name, None)
        if field_name in fixed:
            axes.append([(field_name, fixed[field_name])])
        elif raw is not None:
            values = [v for v in str(raw).split(",") if v.strip()]
            if not values:
                raise MemplanError(f"{flag} needs a value")
            try:
                axes.append([(field_name, parse(v.strip())) for v in values])
            except MemplanError as e:
                raise MemplanError(f"{flag}: {e}") from None
    specs = []
    for combo in itertools.product(*axes):
        try:
            specs.append(TrainSpec(**dict(combo)))
        except MemplanError as e:
            raise MemplanError(f"{e} (in {', '.join(f'{k}={v}' for k, v in combo)})") from None
    return specs


def varying_fields(specs: list[TrainSpec]) -> list[str]:
    """The TrainSpec fields that differ across a grid: the columns a grid table needs."""
    if len(specs) < 2:
        return []
    first = specs[0].to_dict()
    return [k for k in first if any(s.to_dict()[k] != first[k] for s in specs[1:])]
