"""Read a config.json the way transformers does, without importing it.

hf_configs.json (generated from the installed transformers by scripts/gen_hf_configs.py; it names the version)
holds, per model_type that AutoModelForCausalLM builds, the config class's attribute_map, its field defaults and
the JSON kinds its strict dataclass accepts. `read_config` applies them:

- old model_type names transformers' own conversion maps to a native class (Falcon's RefinedWeb/RefinedWebModel,
  with n_layer/n_head/n_head_kv renamed as its convert_custom_code_checkpoint.py did);
- a native model_type is read natively whatever `auto_map` says (AutoConfig uses the native class unless asked
  for remote code), and the returned notes say so; a model_type only remote code provides needs
  --trust-remote-code;
- multimodal wrappers (gemma3, mistral3, ...) are read through their text_config: memplan models the language model;
- attribute_map aliases (GPT-2's n_embd, n_layer, n_head) become the standard names too; absent fields take the
  class default; a value of a kind the class rejects is one error line naming the field.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

from memplan.errors import MemplanError

HERE = Path(__file__).parent


@lru_cache(maxsize=None)
def table() -> dict:
    return json.loads((HERE / "hf_configs.json").read_text())


def transformers_version() -> str:
    """The transformers version hf_configs.json was generated from."""
    return table()["transformers"]


def causal_lm_class(model_type: str) -> str | None:
    entry = table()["causal_lm"].get(model_type)
    return entry["causal_lm"] if entry else None


_KIND = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null", list: "list", dict: "dict"}


def read_config(cfg: dict, source: str, *, trust_remote_code: bool = False) -> tuple[dict, list[str]]:
    """(config with transformers' aliases and defaults applied, notes for the output). Raises MemplanError."""
    if not isinstance(cfg, dict):
        raise MemplanError(f"{source}: a config must be a JSON object")
    cfg = copy.deepcopy(cfg)  # nested dicts (rope_scaling) must not be shared: transformers edits them in place
    notes: list[str] = []
    data = table()
    version = data["transformers"]
    model_type = cfg.get("model_type")
    if model_type is None and isinstance(cfg.get("text_config"), dict):
        model_type = cfg["text_config"].get("model_type")
    if not isinstance(model_type, str):
        raise MemplanError(f"{source}: config is missing the field 'model_type'")
    legacy = data["legacy_model_types"].get(model_type)
    original = model_type
    if legacy:
        for flag, key in legacy["flag_if_present"].items():
            cfg[flag] = key in cfg
        for old, new in legacy["renames"].items():
            if old in cfg:
                cfg.setdefault(new, cfg.pop(old))
        cfg.pop("auto_map", None)
        cfg["model_type"] = model_type = legacy["model_type"]
        notes.append(f"model_type {original!r} read as transformers' native {model_type!r} ({legacy['source']})")
    entry = data["causal_lm"].get(model_type)
    if entry is None and isinstance(cfg.get("text_config"), dict) and model_type in data["native_model_types"]:
        entry = {"causal_lm": f"{model_type} (text_config)", "text_config": cfg["text_config"].get("model_type")}
    if entry is None:
        if model_type in data["native_model_types"]:
            raise MemplanError(f"{source}: transformers {version} has no causal-LM class for model_type "
                               f"{model_type!r}; memplan plans causal-LM fine-tuning")
        if cfg.get("auto_map") and not trust_remote_code:
            raise MemplanError(f"{source}: model_type {model_type!r} is provided only by remote code (the "
                               f"config's auto_map), not by transformers {version}; pass --trust-remote-code to read it")
        if not cfg.get("auto_map"):
            raise MemplanError(f"{source}: transformers {version} does not know model_type {model_type!r}")
        return cfg, notes
    if cfg.pop("auto_map", None):
        notes.append(f"the config carries auto_map (remote code); transformers {version} has {model_type!r} natively "
                     f"({entry['causal_lm']}), so memplan reads it natively and trace/profile run transformers' "
                     "code with trust_remote_code=False")
    for old, new in _legacy_names(data, model_type).items():
        if old in cfg and new not in cfg:  # e.g. n_layer in a model_type "falcon" config: FalconConfig ignores it
            raise MemplanError(f"{source}: config field {old!r} is not read by transformers {version} "
                               f"{entry['config_class']} (it would use its default {new}="
                               f"{entry['fields'].get(new, [None])[0]!r}); name it {new!r}")
    if "text_config" in entry:
        text = cfg.get("text_config")
        text = dict(text) if isinstance(text, dict) else {}
        if entry["text_config"]:
            text.setdefault("model_type", entry["text_config"])
        if "tie_word_embeddings" in cfg:  # multimodal wrappers carry the tying flag at the top level
            text.setdefault("tie_word_embeddings", cfg["tie_word_embeddings"])
        notes.append(f"{model_type} is a multimodal model ({entry['causal_lm']}); memplan models its language "
                     f"model ({text.get('model_type')}), not the vision/audio towers")
        inner, inner_notes = read_config(text, f"{source} text_config", trust_remote_code=trust_remote_code)
        return inner, notes + inner_notes
    return _apply_class(cfg, entry, model_type, source, version), notes


def _legacy_names(data: dict, model_type: str) -> dict:
    out = {}
    for legacy in data["legacy_model_types"].values():
        if legacy["model_type"] == model_type:
            out.update(legacy["renames"])
    return out


def _apply_class(cfg: dict, entry: dict, model_type: str, source: str, version: str) -> dict:
    amap = entry["attribute_map"]
    for std, own in amap.items():
        if std in cfg:  # transformers' __setattr__ routes the standard name to the class's own field: it wins
            cfg[own] = cfg[std]
    fields = entry["fields"]
    for key, value in cfg.items():
        spec = fields.get(key)
        if spec is None or spec[1] is None:
            continue
        kind = _KIND.get(type(value))
        if kind not in spec[1]:
            want = " or ".join(spec[1])
            raise MemplanError(f"{source}: config field {key!r} must be {want}, got {value!r} "
                               f"(transformers {version} {entry['config_class']} rejects it)")
    for key, (default, _) in fields.items():
        if key not in cfg and default is not None:
            cfg[key] = default
    for std, own in amap.items():  # the standard names the builders read
        if own in cfg and std not in cfg:
            cfg[std] = cfg[own]
    cfg["model_type"] = model_type
    return cfg
