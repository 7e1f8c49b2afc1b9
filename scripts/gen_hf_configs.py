"""Regenerate memplan/catalog/hf_configs.json from the installed transformers.

memplan reads config.json files the way transformers does, without importing it (`memplan estimate` stays
torch-free): for every model_type AutoModelForCausalLM can build, this records the config class's attribute_map
(aliases such as GPT-2's n_layer -> num_hidden_layers), its field defaults and their types (transformers 5's
strict config dataclasses reject a value of the wrong type), the class AutoModelForCausalLM builds, and the
model_type of its text sub-config (multimodal wrappers such as gemma3). Every other model_type transformers knows
is listed by name, so that memplan can tell "native, but not a causal LM" from "only remote code provides it".

    python scripts/gen_hf_configs.py            # writes memplan/catalog/hf_configs.json
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "memplan" / "catalog" / "hf_configs.json"

# Model types older checkpoints name that transformers' own conversion maps to a native class:
# transformers 4.x models/falcon/convert_custom_code_checkpoint.py rewrote "RefinedWeb"/"RefinedWebModel" configs
# (the remote RWConfig, whose attribute_map is n_layer/n_head/n_head_kv) to model_type "falcon", renamed
# n_head -> num_attention_heads, n_layer -> num_hidden_layers, n_head_kv -> num_kv_heads, and set
# new_decoder_architecture to whether n_head_kv was there.
_RW = {"model_type": "falcon",
       "renames": {"n_head": "num_attention_heads", "n_layer": "num_hidden_layers", "n_head_kv": "num_kv_heads"},
       "flag_if_present": {"new_decoder_architecture": "n_head_kv"},
       "source": "transformers 4.x models/falcon/convert_custom_code_checkpoint.py"}
LEGACY = {"RefinedWeb": _RW, "RefinedWebModel": _RW}

_KINDS = {"int": "int", "float": "float", "bool": "bool", "str": "str", "None": "null", "NoneType": "null",
          "list": "list", "tuple": "list", "dict": "dict", "RopeParameters": "dict", "Any": "any"}


def _kinds(annotation) -> list[str] | None:
    """The JSON kinds a field accepts, from its annotation; None where memplan should not check (classes)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    if not isinstance(annotation, str) and not hasattr(annotation, "__args__"):
        text = getattr(annotation, "__name__", str(annotation))
    else:
        text = str(annotation)
    text = re.sub(r"typing\.|builtins\.", "", text)
    tops, depth, cur = [], 0, ""
    for ch in text:  # split the top-level union on "|" only
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "|" and depth == 0:
            tops.append(cur.strip())
            cur = ""
        else:
            cur += ch
    tops.append(cur.strip())
    kinds = []
    for t in tops:
        base = t.split("[")[0].strip()
        if base.startswith("Optional"):
            return None
        if base not in _KINDS:
            return None
        kinds.append(_KINDS[base])
    return None if "any" in kinds else sorted(set(kinds))


def _default(f):
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None, False
    try:
        json.dumps(value)
    except TypeError:
        return None, False
    return value, True


def main() -> int:
    import transformers
    from transformers.configuration_utils import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    base_fields = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    table = {}
    for model_type, causal in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        cls = CONFIG_MAPPING[model_type]
        fields = {}
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if f.name in base_fields or f.name.startswith("_"):
                    continue
                value, ok = _default(f)
                if not ok or (isinstance(value, (list, dict)) and len(json.dumps(value)) > 200):
                    value = None  # large defaults (id lists) change no shape memplan reads
                fields[f.name] = [value, _kinds(f.type)]
        entry = {"config_class": cls.__name__, "causal_lm": causal if isinstance(causal, str) else causal[0],
                 "attribute_map": dict(cls.attribute_map), "fields": fields}
        if "text_config" in getattr(cls, "sub_configs", {}):
            try:
                entry["text_config"] = cls().text_config.model_type
            except Exception:  # noqa: BLE001 - a wrapper whose default cannot be built: no text default
                pass
        table[model_type] = entry
    data = {
        "about": "How transformers reads each config.json, for memplan's torch-free loader: per model_type "
                 "AutoModelForCausalLM can build, the config class's attribute_map (alias -> field), its field "
                 "defaults and accepted JSON kinds (strict dataclass validation), the class AutoModelForCausalLM "
                 "builds and, for multimodal wrappers, the model_type of text_config. Generated; do not edit.",
        "generated_by": "scripts/gen_hf_configs.py",
        "transformers": transformers.__version__,
        "native_model_types": sorted(CONFIG_MAPPING_NAMES),
        "legacy_model_types": LEGACY,
        "causal_lm": table,
    }
    OUT.write_text(json.dumps(data, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{OUT}: {len(table)} causal-LM model types, {len(CONFIG_MAPPING_NAMES)} native, "
          f"transformers {transformers.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
