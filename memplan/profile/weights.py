"""Random-weight checkpoints: a model folder written from a config, so that `from_pretrained` loads it exactly as it
loads a downloaded model. Memory does not depend on weight values, so nothing needs a download.

The folder is written shard by shard: the model is built on the `meta` device (no memory), its tensors are grouped
into shards of whole decoder layers (up to 2 GiB each), and each shard's tensors are generated, saved
(safetensors) and freed before the next. Writing a 70B folder never holds more than one shard in RAM; `from_pretrained` then loads (and bitsandbytes
quantizes) shard by shard too. Folders are cached by a hash of the config and the dtype under
`~/.cache/memplan/random-weights` (override with --weights-cache or MEMPLAN_WEIGHTS_CACHE).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

FORMAT = 2  # bump when the folder layout changes, so old cache entries are not reused
COMPLETE = ".complete"  # marker written last: a folder without it is a partial write and is rebuilt
_LAYER = re.compile(r"\.layers?\.(\d+)\.|\.h\.(\d+)\.|\.blocks?\.(\d+)\.")


def default_cache_dir() -> Path:
    env = os.environ.get("MEMPLAN_WEIGHTS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memplan" / "random-weights"


def config_hash(hf_config: dict, dtype: str) -> str:
    blob = json.dumps({"config": hf_config, "dtype": dtype, "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def meta_model(hf_config: dict, dtype: str = "bf16", trust_remote_code: bool = False):
    """The model transformers builds for this config, on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code)


def _layer_index(name: str) -> int | None:
    m = _LAYER.search("." + name)
    if not m:
        return None
    return int(next(g for g in m.groups() if g is not None))


_POOL_LEN = 1_048_573  # a prime: the tiling does not line up with any row length


def _random_like(name: str, meta_tensor, pool):
    """A tensor of `meta_tensor`'s shape and dtype: norm weights 1, biases 0, matrices N(0, 0.02) values tiled from
    a pool of about a million (generating 70B fresh normal samples would take many minutes; memory and bytes on
    disk do not depend on the values)."""
    import torch

    shape, dtype = tuple(meta_tensor.shape), meta_tensor.dtype
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # norms weights = 1, biases = 0: keeps the random model's numerics sane
        return torch.ones(shape, dtype=dtype) if name.endswith("weight") else torch.zeros(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    src = pool.get(dtype)
    if src is None:
        src = pool[dtype] = pool["fp32"].to(dtype)
    for start in range(0, flat.numel(), src.numel()):
        n = min(src.numel(), flat.numel() - start)
        flat[start:start + n].copy_(src[:n])
    return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _plan_shards(named: list, layers_per_shard: int | None, max_shard_bytes: int) -> list[list]:
    """Tensors outside the decoder layers first (packed up to max_shard_bytes per shard), then whole layers,
    `layers_per_shard` per shard (default: as many as fit in max_shard_bytes, at least one)."""
    outside, layers = [], {}
    for name, t in named:
        idx = _layer_index(name)
        if idx is None:
            outside.append((name, t))
        else:
            layers.setdefault(idx, []).append((name, t))
    shards, cur, size = [], [], 0
    for item in outside:
        if cur and size + _nbytes(item[1]) > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += _nbytes(item[1])
    if cur:
        shards.append(cur)
    if layers:
        per_layer = max(sum(_nbytes(t) for _, t in group) for group in layers.values())
        lps = layers_per_shard or max(1, max_shard_bytes // max(per_layer, 1))
        order = sorted(layers)
        for i in range(0, len(order), lps):
            shards.append([item for idx in order[i:i + lps] for item in layers[idx]])
    return shards


def write_random_checkpoint(hf_config: dict, dtype: str = "bf16", cache_dir: str | Path | None = None,
                            layers_per_shard: int | None = None, trust_remote_code: bool = False, log=None,
                            max_shard_bytes: int = 2 * 2**30) -> Path:
    """Write (or reuse) a random-weight safetensors folder for `hf_config`; returns the folder.

    Safe against interruption: shards go into a temporary folder renamed into place only when complete."""
    import torch
    from safetensors.torch import save_file

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = cache / f"{hf_config.get('model_type', 'model')}-{dtype}-{config_hash(hf_config, dtype)}"
    if (folder / COMPLETE).is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        model = meta_model(hf_config, dtype, trust_remote_code)
        # keep_vars: identical objects for tied tensors, so a tied lm_head is written once (as transformers saves it)
        seen, named = set(), []
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            named.append((name, tensor))
        shards = _plan_shards(named, layers_per_shard, max_shard_bytes)
        gen = torch.Generator().manual_seed(0)
        pool = {"fp32": torch.empty(_POOL_LEN, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)}
        weight_map, total = {}, 0
        for i, group in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            shard = {name: _random_like(name, t, pool).contiguous() for name, t in group}
            total += sum(t.numel() * t.element_size() for t in shard.values())
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            del shard
            for name, _ in group:
                weight_map[name] = fname
            if log:
                log(f"wrote shard {i}/{len(shards)}")
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        config = model.config.to_dict()
        config["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        (tmp / COMPLETE).write_text(json.dumps({"bytes": total, "seconds": time.perf_counter() - t0,
                                                "format": FORMAT}))
        if folder.exists():  # a concurrent writer won, or a stale partial folder: replace the latter
            if (folder / COMPLETE).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                return folder
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def list_cache(cache_dir: str | Path | None = None) -> list[dict]:
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = []
    if not cache.is_dir():
        return out
    for d in sorted(cache.iterdir()):
        if not d.is_dir():
            continue
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        out.append({"path": str(d), "bytes": size, "complete": (d / COMPLETE).is_file(),
                    "mtime": d.stat().st_mtime})
    return out


def clean_cache(cache_dir: str | Path | None = None, older_than_days: float | None = None,
                partial_only: bool = False) -> list[str]:
    """Remove cached random checkpoints (all, those older than N days, or only partial writes)."""
    removed = []
    now = time.time()
    for entry in list_cache(cache_dir):
        if partial_only and entry["complete"]:
            continue
        if older_than_days is not None and now - entry["mtime"] < older_than_days * 86400:
            continue
        shutil.rmtree(entry["path"], ignore_errors=True)
        removed.append(entry["path"])
    return removed
