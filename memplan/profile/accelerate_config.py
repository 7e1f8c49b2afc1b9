"""The accelerate config file a multi-GPU profile launches with (`accelerate launch --config_file F`), from the flags.

The file is what `accelerate config` writes (accelerate 1.15: commands/config/config_args.py ClusterConfig, whose
loader refuses unknown keys), for one machine:
- --parallel fsdp / fsdp-grad-op: distributed_type FSDP with fsdp_config fsdp_version 2,
  fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP on the model's decoder layer class, fsdp_reshard_after_forward
  true (FULL_SHARD) / false (SHARD_GRAD_OP: FSDP2 keeps a layer unsharded from its forward to its backward),
  fsdp_offload_params (--offload params: FSDP2's CPUOffloadPolicy), fsdp_cpu_ram_efficient_loading false (every
  rank loads the checkpoint; accelerate skips that loading path for 4-bit models anyway).
- --parallel ddp: MULTI_GPU (accelerate wraps DistributedDataParallel). On the CPU too: accelerate's MULTI_CPU type
  is reached only through `--cpu` / the simple launcher, which starts a single process unless mpirun runs it
  (commands/launch.py launch_command, utils/launch.py prepare_simple_launcher_cmd_env); MULTI_GPU / FSDP with
  use_cpu true go through torchrun (multi_gpu_launcher), one process per rank.
- --parallel zero1/2/3: DEEPSPEED with deepspeed_config zero_stage, offload_optimizer_device /
  offload_param_device (cpu or none), gradient_accumulation_steps 1, zero3_init_flag false (every rank loads the
  whole model before the engine partitions it, as with fsdp_cpu_ram_efficient_loading false; the load phase's
  peak is therefore the unpartitioned model's).
- mixed_precision: 'no' for FSDP and DDP, the compute dtype (bf16 / fp16) for DeepSpeed. memplan's recipe (the one
  the estimate, the trace and the single-GPU profile run) loads the weights in the compute dtype and keeps PEFT's
  fp32 adapters, without autocast; accelerate's bf16 would add what that recipe does not model (FSDP2's
  MixedPrecisionPolicy with param_dtype bf16, an fp32 upcast of 16-bit trainable parameters in
  fsdp2_prepare_model, autocast around DDP's forward). DeepSpeed's engine runs in its bf16 / fp16 mode or not at all
  in half precision: accelerate's DeepSpeedPlugin.set_mixed_precision writes bf16.enabled from it.
- use_cpu true with --device cpu; main_process_port 0 (accelerate picks a free port).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path


def strategy_type(strategy: str) -> str:
    if strategy.startswith("fsdp"):
        return "FSDP"
    if strategy.startswith("zero"):
        return "DEEPSPEED"
    return "MULTI_GPU"


def accelerate_config(train, device: str, layer_cls: str | None) -> dict:
    """The config file's contents for this configuration (train.gpus processes on one machine)."""
    s = train.strategy
    kind = strategy_type(s)
    half = train.bits != 32 and train.compute_dtype in ("bf16", "fp16")
    cfg = {"compute_environment": "LOCAL_MACHINE", "debug": False, "distributed_type": kind,
           "downcast_bf16": "no", "machine_rank": 0, "main_training_function": "main",
           "mixed_precision": train.compute_dtype if kind == "DEEPSPEED" and half else "no",
           "num_machines": 1, "num_processes": train.gpus, "main_process_port": 0, "rdzv_backend": "static",
           "same_network": True, "use_cpu": device == "cpu"}
    if kind == "FSDP":
        fsdp = {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_reshard_after_forward": s == "fsdp", "fsdp_offload_params": train.offload == "params",
                "fsdp_cpu_ram_efficient_loading": False, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
                "fsdp_activation_checkpointing": False}
        if layer_cls:
            fsdp["fsdp_transformer_layer_cls_to_wrap"] = layer_cls
        cfg["fsdp_config"] = fsdp
    elif kind == "DEEPSPEED":
        cfg["deepspeed_config"] = {
            "zero_stage": int(s[-1]), "gradient_accumulation_steps": 1, "zero3_init_flag": False,
            "offload_optimizer_device": "cpu" if train.offload in ("optimizer", "params") else "none",
            "offload_param_device": "cpu" if train.offload == "params" else "none"}
    return cfg


def fsdp_plugin(train, layer_cls: str):
    """accelerate's FullyShardedDataParallelPlugin as the config file makes it in each rank (the rank trace wraps
    with it: memplan.trace.distributed._fully_shard)."""
    import os

    from accelerate.utils import FullyShardedDataParallelPlugin

    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"  # the plugin exports its setting for transformers: not in this process
    saved = os.environ.get(key)
    try:
        return FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=[layer_cls],
            reshard_after_forward=train.strategy == "fsdp", cpu_offload=train.offload == "params",
            cpu_ram_efficient_loading=False, state_dict_type="SHARDED_STATE_DICT", activation_checkpointing=False)
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def write_config(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=True))
    return path


def launch_argv(config_path: Path, job_path: Path) -> list[str]:
    """`accelerate launch --config_file F -m memplan.profile.rank JOB.json`, with this interpreter's accelerate."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path), "-m",
            "memplan.profile.rank", str(job_path)]


def shown(argv: list[str]) -> str:
    """The command as a user types it."""
    args = argv[3:] if argv[1:3] == ["-m", "accelerate.commands.launch"] else argv
    return "accelerate launch " + shlex.join(args)


def decoder_layer_class(hf_config: dict, trust_remote_code: bool = False) -> str | None:
    """The decoder layer class name accelerate's TRANSFORMER_BASED_WRAP wraps (what users put in
    fsdp_transformer_layer_cls_to_wrap): the model class's _no_split_modules entry naming a decoder layer, else
    the class of the first decoder layer of the model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config)
    remote = bool(cfg.get("auto_map"))
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if not remote:
        try:
            cls = AutoModelForCausalLM._model_mapping[type(config)]
        except KeyError:
            cls = None
        names = [n for n in (getattr(cls, "_no_split_modules", None) or []) if n.endswith("DecoderLayer")]
        if len(names) == 1:
            return names[0]
    import torch

    from memplan.trace.distributed import _decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    try:
        return type(_decoder_layers(model)[0]).__name__
    except Exception:  # noqa: BLE001 - no decoder layers found: accelerate then uses _no_split_modules itself
        return None
