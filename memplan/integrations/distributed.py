"""DeepSpeed and FSDP settings of a trainer config onto memplan's multi-GPU flags (--parallel, --fsdp-version,
--offload), shared by the readers. The GPU count is never in these files: a strategy needs --gpus N
(config.LAUNCHER), asked for through a deferred error that --gpus or --parallel on the command line lifts.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from memplan.integrations.config import LAUNCHER, Reader, _show


def multi_gpu(r: Reader, key: str, parallel: str, fsdp_version=None, offload: str = "none", shown=None,
              why: str = "") -> None:
    """A DeepSpeed / FSDP strategy onto parallel, fsdp_version and offload; the GPU count must come from --gpus
    (or --parallel replaces the strategy)."""
    r.set("parallel", parallel, key, shown, why)
    if fsdp_version is not None:
        r.set("fsdp_version", fsdp_version, key, shown)
    r.set("offload", offload, key, shown)
    r.defer("gpus", key, f"--parallel {parallel} runs on several GPUs and {LAUNCHER}: give --gpus N (the number of "
            "processes; --gpus 1 for one GPU) and the estimate is per rank of those N", waived_by=("parallel",))


# The DeepSpeed configs the trainers ship, read from their names when the file is not on this machine: axolotl's
# deepspeed_configs/zero{1,2,3}.json, zero3_bf16_cpuoffload_{params,all}.json, zero3_cpuoffload.json (axolotl 0.19)
# and LLaMA-Factory's examples/deepspeed/ds_z{0,2,3}_config.json, ds_z{2,3}_offload_config.json (0.9.5). In all of
# them "offload" at stage 3 offloads the parameters (offload_param), at stage 1/2 the optimizer (offload_optimizer).
DEEPSPEED_NAME = r"(?:zero|ds_z)_?(\d)"


def deepspeed_settings(r: Reader, key: str, value) -> None:
    """A DeepSpeed config (a path to a JSON file, or inline) onto parallel zero1/2/3 (stage 0: ddp) and offload.
    A path not on this machine is read from its name, as axolotl's deepspeed_configs/zero{1,2,3}*.json."""
    cfg, how = value, ""
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = Path(r.path).parent / path
        if not path.is_file():
            name = Path(value).name.lower()
            found = re.search(DEEPSPEED_NAME, name)
            if not found or int(found.group(1)) > 3:
                r.not_modelled(key, f"DeepSpeed config {value!r} is not next to the config and its name gives no "
                                    "ZeRO stage; pass --parallel zero1|zero2|zero3 and --offload", value)
                return
            stage = int(found.group(1))
            offload = "none" if "offload" not in name else "params" if stage == 3 else "optimizer"
            r.used.add(key)
            multi_gpu(r, key, f"zero{stage}" if stage else "ddp", offload=offload, shown=value,
                      why="from the file name (the trainer's shipped DeepSpeed configs): the file is not on this "
                          "machine")
            return
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise r.error(key, f"cannot read DeepSpeed config {value!r}: {e.__class__.__name__}") from None
        how = f"read from {path.name}"
    if not isinstance(cfg, dict):
        raise r.error(key, f"expected a DeepSpeed config path or mapping, got {_show(value)!r}")
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        r.not_modelled(key, f"DeepSpeed config without a ZeRO stage ({_show(stage)})", value)
        return
    offload = "none"
    if isinstance(zero, dict):
        def device(k):
            return (zero.get(k) or {}).get("device") if isinstance(zero.get(k), dict) else None

        params, optim = device("offload_param") in ("cpu", "nvme"), device("offload_optimizer") in ("cpu", "nvme")
        if params:
            offload = "params"
            if not optim:
                r.m.notes.append(f"{key}: offload_param without offload_optimizer: memplan's --offload params also "
                                 "moves the fp32 optimizer states to the host (the GPU estimate is low by their shard)")
        elif optim:
            offload = "optimizer"
        if "nvme" in (device("offload_param"), device("offload_optimizer")):
            r.m.notes.append(f"{key}: offload to NVMe: memplan counts it as host RAM")
    r.used.add(key)
    multi_gpu(r, key, f"zero{stage}" if stage else "ddp", offload=offload, shown=value, why=how)


FSDP_STRATEGIES = {"full_shard": "fsdp", "shard_grad_op": "fsdp-grad-op", "hybrid_shard": "fsdp",
                   "hybrid_shard_zero2": "fsdp-grad-op"}


def fsdp_settings(r: Reader, key: str, options, cfg: dict, default_version: int) -> None:
    """FSDP as transformers' TrainingArguments (5.24 training_args.py _process_fsdp_args) and axolotl read it:
    `fsdp` options (full_shard / shard_grad_op / offload / auto_wrap, a string or a list, or true) and fsdp_config
    (keys with or without the fsdp_ prefix: version / fsdp_version, reshard_after_forward, cpu_offload /
    offload_params, sharding_strategy). FULL_SHARD = reshard_after_forward true (fsdp); SHARD_GRAD_OP = false
    (fsdp-grad-op); hybrid sharding shards within a node, which memplan models as one node."""
    cfg = {k.removeprefix("fsdp_"): v for k, v in (cfg or {}).items()}
    opts = options.split() if isinstance(options, str) else list(options) if isinstance(options, list) else []
    unknown = [o for o in opts if o not in (*FSDP_STRATEGIES, "no_shard", "offload", "auto_wrap")]
    if unknown:
        raise r.error(key, f"unknown fsdp option {unknown[0]!r}; transformers has full_shard, shard_grad_op, "
                      "hybrid_shard, hybrid_shard_zero2, no_shard, offload, auto_wrap")
    version = cfg.get("version", default_version)
    if version not in (1, 2, "1", "2"):
        raise r.error("fsdp_config.version", f"expected 1 or 2, got {_show(version)!r}")
    version = int(version)
    strategy = next((FSDP_STRATEGIES[o] for o in opts if o in FSDP_STRATEGIES), None)
    reshard = cfg.get("reshard_after_forward")
    sharding = cfg.get("sharding_strategy")
    if isinstance(reshard, str):  # FSDP1 keeps the strategy name here
        sharding = sharding or reshard
        reshard = None
    if isinstance(sharding, str):
        low = sharding.lower()
        if low == "no_shard" or low == "3":
            r.not_modelled(key, "FSDP NO_SHARD is DDP: pass --parallel ddp", sharding)
            return
        strategy = FSDP_STRATEGIES.get(low, {"1": "fsdp", "2": "fsdp-grad-op", "4": "fsdp", "5": "fsdp-grad-op"}
                                       .get(low, strategy))
    if isinstance(reshard, bool):
        strategy = "fsdp" if reshard else "fsdp-grad-op"
    if "no_shard" in opts and strategy is None:
        r.not_modelled(key, "FSDP no_shard is DDP: pass --parallel ddp", options)
        return
    offload = "offload" in opts or any(cfg.get(k) is True for k in ("cpu_offload", "offload_params"))
    hybrid = any("hybrid" in str(x).lower() for x in (*opts, sharding or ""))
    multi_gpu(r, key, strategy or "fsdp", fsdp_version=version, offload="params" if offload else "none",
              shown=options if options not in (None, True) else cfg,
              why="hybrid sharding: shards within a node, modelled as one node" if hybrid else "")
