"""Where models and GPUs come from: the shipped catalog (models.json, gpus.json), a local config.json or model
folder, or a hub id already in the local Hugging Face cache. Never downloads. No torch import."""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from memplan.architectures import from_hf_config
from memplan.catalog.hfconfig import read_config
from memplan.errors import MemplanError
from memplan.spec import ModelSpec

HERE = Path(__file__).parent


def _key(name: str) -> str:
    return name.strip().lower()


@lru_cache(maxsize=None)
def models() -> dict[str, dict]:
    """Catalog entries by canonical name (models.json keeps each entry's source)."""
    return {_key(m["name"]): m for m in json.loads((HERE / "models.json").read_text())["models"]}


@lru_cache(maxsize=None)
def _model_aliases() -> dict[str, str]:
    table = {}
    for key, entry in models().items():
        for alias in [entry["name"], entry.get("hf_id") or "", *entry.get("aliases", [])]:
            if alias:
                table[_key(alias)] = key
    return table


def resolve_model(ref: str, trust_remote_code: bool = False) -> ModelSpec:
    """A catalog name or alias (case-insensitive), a config.json path or a folder holding one, or a hub id in the
    local Hugging Face cache, in that order. Configs are read as transformers reads them (hfconfig.py): a native
    model_type whatever its auto_map says; a model_type only remote code provides only with trust_remote_code
    (memplan never runs that code)."""
    key = _model_aliases().get(_key(ref))
    if key is not None:
        entry = models()[key]
        return _spec(entry["config"], entry["name"], entry["source"], True, stated=entry.get("stated_params"))
    path = Path(ref).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise MemplanError(f"{ref}: folder has no config.json")
    if path.is_file():
        name = path.parent.name if path.name == "config.json" else path.stem
        return _spec(_read_json(path), name, str(path), trust_remote_code)
    if "/" in ref and not ref.startswith((".", "/", "~")):
        cached = _hub_cache_config(ref)
        if cached is not None:
            return _spec(_read_json(cached), ref, str(cached), trust_remote_code)
        raise MemplanError(
            f"unknown model {ref!r}: not in the catalog and not in the local Hugging Face cache "
            f"(memplan never downloads; pass a config.json path){_suggest(ref)}"
        )
    raise MemplanError(f"unknown model {ref!r}{_suggest(ref)}")


def _suggest(ref: str) -> str:
    names = sorted({models()[k]["name"] for k in _model_aliases().values()})
    pool = list(_model_aliases())
    close = difflib.get_close_matches(_key(ref), pool, n=8, cutoff=0.5)
    picks = []
    for alias in close:
        name = models()[_model_aliases()[alias]]["name"]
        if name not in picks:
            picks.append(name)
    if not picks:  # substring match, e.g. "llama" -> every llama
        picks = [n for n in names if _key(ref).split("/")[-1] in n][:5]
    return f"; did you mean: {', '.join(picks[:3])}?" if picks else "; `memplan models` lists the catalog"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise MemplanError(f"{path}: cannot read: {e.__class__.__name__}") from None
    except json.JSONDecodeError as e:
        raise MemplanError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise MemplanError(f"{path}: a config must be a JSON object")
    return data


def _spec(cfg: dict, name: str, source: str, trust_remote_code: bool, stated: int | None = None) -> ModelSpec:
    """A config as transformers reads it (hfconfig.read_config), normalized into a ModelSpec."""
    cfg, notes = read_config(cfg, source, trust_remote_code=trust_remote_code)
    spec = from_hf_config(cfg, name, source)
    return replace(spec, stated_params=stated, notes=tuple(notes) + spec.notes)


def _hub_cache_config(repo_id: str) -> Path | None:
    """The config.json of a hub id in the local cache (huggingface_hub's layout), without importing it."""
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))))
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    snapshots = repo / "snapshots"
    if ref.is_file() and (snapshots / ref.read_text().strip() / "config.json").is_file():
        return snapshots / ref.read_text().strip() / "config.json"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------------ GPUs


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # total memory as the driver reports it (nvidia-smi "Total"), bytes
    kind: str  # consumer | workstation | datacenter
    source: str
    host_link: str = ""  # e.g. "PCIe 4.0 x16": the link offloaded activations and paged states cross
    host_link_gbs: float = 0.0  # its theoretical bandwidth per direction, GB/s (10^9 B/s); gpus.json "about"


@lru_cache(maxsize=None)
def gpus() -> dict[str, GPU]:
    table = {}
    for g in json.loads((HERE / "gpus.json").read_text())["gpus"]:
        gpu = GPU(g["name"], int(g["memory_mib"]) * 2**20, g["kind"], g["source"], g.get("host_link", ""),
                  float(g.get("host_link_gbs", 0.0)))
        for alias in [g["name"], *g.get("aliases", [])]:
            table[_key(alias)] = gpu
    return table


def resolve_gpu(name: str) -> GPU:
    gpu = gpus().get(_key(name))
    if gpu is None:
        names = sorted({g.name for g in gpus().values()})
        picks = [n for n in names if _key(name) in n]  # "a100" -> both A100 sizes
        picks += [gpus()[c].name for c in difflib.get_close_matches(_key(name), list(gpus()), n=3, cutoff=0.4)]
        picks = list(dict.fromkeys(picks))[:4]
        hint = f"; did you mean: {', '.join(picks)}?" if picks else "; `memplan gpus MODEL` lists the catalog GPUs"
        raise MemplanError(f"unknown GPU {name!r}{hint}")
    return gpu


def gpu_list() -> list[GPU]:
    """Each GPU once, smallest memory first."""
    return sorted({g.name: g for g in gpus().values()}.values(), key=lambda g: (g.memory_bytes, g.name))
