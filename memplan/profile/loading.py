"""Loading the base model the way users do, on a real device.

`load_pretrained` (the default) is the user's path: `AutoModelForCausalLM.from_pretrained(folder,
quantization_config=BitsAndBytesConfig(...), dtype=..., device_map={"": device}, attn_implementation=...)` on
either the user's own safetensors checkpoint (--weights DIR) or a random-weight folder written from the config
(memplan.profile.weights). transformers loads it shard by shard and bitsandbytes quantizes each weight as it
arrives on the device, so the unquantized model never has to fit at once.

`load_direct` (--load direct; the GPU validation script uses it) skips the disk: the model is built on the meta
device, transformers' own bitsandbytes quantizer swaps the linears (HfQuantizer.preprocess_model, as
from_pretrained does), and each parameter is then created on the device with random values, module by module, and
quantized there with the same bitsandbytes call from_pretrained makes (`Params4bit(value, **old.__dict__).to(dev)`,
transformers/integrations/bitsandbytes.py Bnb4bitQuantize). Same resulting tensors, no 140 GB folder for a 70B.
"""
from __future__ import annotations

import json
from pathlib import Path

from memplan.errors import MemplanError



def load_dtype(train) -> str:
    """The dtype name (fp32/bf16/fp16) the base model is loaded in (memplan.recipe.torch_dtype)."""
    return "fp32" if train.bits == 32 else train.compute_dtype


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.save / pickle formats: never loaded


def pickle_files(folder: str | Path) -> list[str]:
    """The pickle-format files in a checkpoint folder (model weights or trainer state): memplan never loads them."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES))


def _safetensors_header_ok(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and that many bytes of a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return False
            n = int.from_bytes(head, "little")
            if n <= 1 or n > 100 * 2**20 or n + 8 > path.stat().st_size:
                return False
            header = json.loads(f.read(n))
        return isinstance(header, dict)
    except (OSError, ValueError, RecursionError):
        return False


def check_weights_dir(path: str | Path) -> Path:
    """A user checkpoint folder: config.json and safetensors weights, complete and well-formed. Errors are one line.

    The weights are loaded only from safetensors (from_pretrained(..., use_safetensors=True)); a folder without
    them is refused, pickle checkpoints (.bin/.pt/...) included. Pickle files next to complete safetensors weights
    (a trainer's training_args.bin, optimizer.pt, or an old pytorch_model.bin) are allowed and never read:
    `pickle_files` names them so the command can say so. The safetensors set must be complete (every shard of
    model.safetensors.index.json present, each a .safetensors file with a valid header), so that nothing can
    make transformers look for another format."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise MemplanError(f"--weights {path}: not a folder")
    if not (folder / "config.json").is_file():
        raise MemplanError(f"--weights {path}: no config.json in that folder")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = pickle_files(folder)
        raise MemplanError(f"--weights {path}: no .safetensors files"
                           + (f" (pickle checkpoints such as {pickles[0]} are never loaded: convert them to "
                              "safetensors)" if pickles else ""))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, AttributeError, TypeError):
            raise MemplanError(f"--weights {path}: {index.name} is not a valid safetensors index") from None
        bad = [n for n in names if not isinstance(n, str) or not n.endswith(".safetensors") or "/" in n
               or "\\" in n]
        if bad:
            raise MemplanError(f"--weights {path}: {index.name} names a shard that is not a .safetensors file in "
                               f"the folder: {bad[0]!r}")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise MemplanError(f"--weights {path}: {index.name} lists {len(missing)} missing shard(s), e.g. "
                               f"{missing[0]}")
    for shard in shards:
        if not _safetensors_header_ok(shard):
            raise MemplanError(f"--weights {path}: {shard.name} is not a valid safetensors file")
    return folder


def load_pretrained(folder: str | Path, train, device: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    from memplan.recipe import bnb_config, torch_dtype

    kwargs = {}
    q = bnb_config(train)
    if q is not None:
        kwargs["quantization_config"] = q
    return AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch_dtype(train), device_map={"": device},
        attn_implementation=train.attention, use_safetensors=True, trust_remote_code=trust_remote_code,
        low_cpu_mem_usage=True, **kwargs)


def load_direct(hf_config: dict, train, device: str, trust_remote_code: bool = False, seed: int = 0):
    """Meta-init + per-module random init on the device, quantized there (see the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from memplan.recipe import bnb_config, torch_dtype

    cfg = dict(hf_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    dtype = torch_dtype(train)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=train.attention,
                                                 trust_remote_code=trust_remote_code)
    q = bnb_config(train)
    hfq = None
    if q is not None:
        from transformers.quantizers.auto import AutoHfQuantizer

        hfq = AutoHfQuantizer.from_config(q, pre_quantized=False)
        try:
            hfq.preprocess_model(model, device_map={"": device}, dtype=dtype)
        except TypeError:  # other transformers 5.x signatures
            hfq.preprocess_model(model, device_map={"": device})
    gen = torch.Generator(device=device).manual_seed(seed)
    tied = _tied_groups(model)
    done: dict[int, torch.nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if id(param) in done:  # tied weights: one tensor, two names
                setattr(module, pname, done[id(param)])
                continue
            if param.device.type != "meta":
                continue
            # a weight bitsandbytes will quantize arrives in the load dtype, as from the checkpoint
            value = _random(param, device, gen, pname, dtype if _is_bnb(param) else None)
            new = _quantized_param(param, value) if q is not None else None
            if new is None:
                new = torch.nn.Parameter(value, requires_grad=param.requires_grad)
            setattr(module, pname, new)
            done[id(param)] = new
            for other in tied.get(full, ()):  # keep ties alive through the swap
                done[id(other)] = new
            del value
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf.device.type == "meta":
                module._buffers[bname] = _buffer(module, bname, buf, device, model.config)
    if hfq is not None:
        model.hf_quantizer = hfq
        hfq.postprocess_model(model)
    model.eval()  # from_pretrained returns eval mode; the recipe puts the model in train mode
    return model


def _tied_groups(model) -> dict:
    out = {}
    try:
        names = dict(model.named_parameters(remove_duplicate=False))
        by_id = {}
        for n, p in names.items():
            by_id.setdefault(id(p), []).append((n, p))
        for group in by_id.values():
            if len(group) > 1:
                for n, _ in group:
                    out[n] = [p for m, p in group if m != n]
    except Exception:
        pass
    return out


def _is_bnb(param) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def _random(param, device, gen, pname: str, dtype=None):
    import torch

    shape, dtype = tuple(param.shape), dtype or param.dtype
    if not dtype.is_floating_point:
        dtype = torch.bfloat16
    if len(shape) == 1:
        return (torch.ones if pname == "weight" else torch.zeros)(shape, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.normal_(0.0, 0.02, generator=gen)


def _quantized_param(old, value):
    """The bitsandbytes parameter from_pretrained would create for `value` (None if `old` is not quantized)."""
    import bitsandbytes as bnb

    if isinstance(old, bnb.nn.Params4bit):
        return bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(value.device)
    if isinstance(old, bnb.nn.Int8Params):
        kwargs = dict(old.__dict__)
        kwargs.pop("SCB", None)
        return bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **kwargs).to(value.device)
    return None


def _buffer(module, name, buf, device, config):
    """Non-persistent buffers (rotary inv_freq) are computed at construction: build the module again on the
    device and take its buffer; anything else becomes zeros."""
    import torch

    try:
        with torch.device(device):
            fresh = type(module)(config)
        value = fresh._buffers.get(name)
        if value is not None and tuple(value.shape) == tuple(buf.shape):
            return value.to(device)
    except Exception:
        pass
    return torch.zeros(buf.shape, dtype=buf.dtype, device=device)
