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
    ("--attention", "attention", _str, "sdpa (fused flash / memory-efficient kernels) | eager (materialized scores) "
     "| flash_attention_2 (transformers' flash-attn integration)"),
    ("--modules-to-save", "modules_to_save", _plus_list, "fully trained modules joined by '+' (lm_head+embed_tokens)"),
    ("--activation-offload", "activation_offload", _str, "saved activations to pinned host RAM: off | all (TRL/"
     "torchtune OffloadActivations) | checkpoints (transformers gradient checkpointing offload=True)"),
    ("--loss", "loss", _str, "standard (b·s·V logits) | liger (Liger fused linear cross-entropy; 'fused' is an "
     "alias) | cce (Cut Cross-Entropy)"),
    ("--liger", "liger", _bool, "Liger Kernel's RMSNorm / SwiGLU / RoPE kernels: on | off"),
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
    parser.add_argument("--from", dest="from_file", metavar="FILE",
                        help="read the settings (and the model) from a trainer config: axolotl or LLaMA-Factory YAML, "
                             "TRL / TrainingArguments JSON or YAML, torchtune recipe YAML; flags given here override it")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="accept a config.json that asks for remote code (auto_map): memplan reads its fields, and "
                             "only with this flag lets transformers (profile) run the model's own code")


def model_from_args(args: argparse.Namespace, ref: str | None = None):
    """The ModelSpec the command's MODEL argument (or `ref`) names, honouring --trust-remote-code."""
    from memplan.catalog import resolve_model

    mapping = from_config(args)
    if ref is None:
        ref = getattr(args, "model", None)
        if isinstance(ref, list):  # sweep's MODEL...
            ref = ref[0] if ref else None
    if ref is None and mapping is not None:
        ref = mapping.model
        if ref is None:
            raise MemplanError(f"{mapping.path} names no model: give MODEL on the command line")
    if ref is None:
        raise MemplanError("give MODEL (a catalog name, config.json or cached hub id) or --from FILE")
    model = resolve_model(ref, trust_remote_code=getattr(args, "trust_remote_code", False))
    if mapping is not None:
        from memplan.integrations.config import check_targets

        check_targets(mapping, model, _given(args))
        print_mapping_once(args)
    return model


def print_mapping_once(args: argparse.Namespace) -> None:
    """The --from mapping, to stderr, once its settings have been checked against the model."""
    mapping = getattr(args, "_from_mapping", None)
    if mapping is not None and not getattr(args, "_from_printed", False) and not getattr(args, "quiet_mapping", False):
        from memplan.integrations.config import print_mapping

        print_mapping(mapping)
        args._from_printed = True


def _given(args: argparse.Namespace) -> dict:
    """The training flags given on the command line: TrainSpec field -> raw text."""
    return {name: getattr(args, name) for _, name, _, _ in FLAGS if getattr(args, name, None) is not None}


def from_config(args: argparse.Namespace):
    """The Mapping of --from FILE (read and checked against the flags once), or None."""
    path = getattr(args, "from_file", None)
    if not path:
        return None
    cached = getattr(args, "_from_mapping", None)
    if cached is None:
        from memplan.integrations.config import read_config, resolve

        cached = read_config(path)
        resolve(cached, _given(args))
        args._from_mapping = cached
    return cached


def grid_from_args(args: argparse.Namespace, **fixed) -> list[TrainSpec]:
    """The TrainSpecs that the flags describe: one per combination of the comma-separated values."""
    axes = []
    mapping = from_config(args)
    base = dict(mapping.settings) if mapping is not None else {}
    for flag, field_name, parse, _ in FLAGS:
        raw = getattr(args, field_name, None)
        if field_name in fixed:
            axes.append([(field_name, fixed[field_name])])
        elif raw is None and field_name in base:
            axes.append([(field_name, base[field_name])])
        elif raw is not None:
            values = [v for v in str(raw).split(",") if v.strip()]
            if not values:
                raise MemplanError(f"{flag} needs a value")
            try:
                axes.append([(field_name, parse(v.strip())) for v in values])
            except MemplanError as e:
                raise MemplanError(f"{flag}: {e}") from None
    flagged = {name for _, name, _, _ in FLAGS}
    axes += [[(k, v)] for k, v in base.items() if k not in flagged and k not in fixed]  # fields without a flag
    specs = []
    for combo in itertools.product(*axes):
        try:
            specs.append(TrainSpec(**dict(combo)))
        except MemplanError as e:
            where = f" (settings from {mapping.path} and the flags)" if mapping is not None else ""
            raise MemplanError(f"{e} (in {', '.join(f'{k}={v}' for k, v in combo)}){where}") from None
    return specs


def varying_fields(specs: list[TrainSpec]) -> list[str]:
    """The TrainSpec fields that differ across a grid: the columns a grid table needs."""
    if len(specs) < 2:
        return []
    first = specs[0].to_dict()
    return [k for k in first if any(s.to_dict()[k] != first[k] for s in specs[1:])]
