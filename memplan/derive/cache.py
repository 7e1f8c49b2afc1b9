"""The derived-architecture cache: one JSON file per (config, library versions), torch-free to read.

    $MEMPLAN_DERIVED_CACHE, else $XDG_CACHE_HOME/memplan/derived, else ~/.cache/memplan/derived
    <model_type>-<config sha256[:16]>-<versions sha256[:8]>.json   (schema memplan.derived/1)

A file holds the ModelSpec read off transformers' meta model and, per training setting that changes activations
(activation_key), the fitted activation terms. A file that cannot be read, is not this schema, or names other
versions or another config is ignored with a warning and rebuilt: never trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from memplan.spec import LayerSpec, Linear, ModelSpec

SCHEMA = "memplan.derived/1"
STACK = ("torch", "transformers", "peft", "bitsandbytes")


@lru_cache(maxsize=None)
def versions() -> dict[str, str | None]:
    """Installed versions of the stack a derivation ran on, from package metadata (no import of the packages)."""
    from memplan.stack import installed

    return {pkg: installed()[pkg] for pkg in STACK}


def cache_dir() -> Path:
    env = os.environ.get("MEMPLAN_DERIVED_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memplan" / "derived"


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def path_for(cfg: dict) -> Path:
    vhash = hashlib.sha256(json.dumps(versions(), sort_keys=True).encode()).hexdigest()[:8]
    return cache_dir() / f"{cfg['model_type']}-{config_hash(cfg)[:16]}-{vhash}.json"


def warn(message: str) -> None:
    print(f"memplan: warning: {message}", file=sys.stderr)


def load(cfg: dict) -> dict | None:
    """The cache document for this config under the installed versions, or None (with a warning if a file was
    there but unusable)."""
    path = path_for(cfg)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warn(f"ignoring unreadable derived-architecture cache {path} ({e.__class__.__name__}); rebuilding it")
        return None
    if (not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("versions") != versions()
            or doc.get("config_hash") != config_hash(cfg) or not isinstance(doc.get("spec"), dict)
            or not isinstance(doc.get("activations", {}), dict)):
        warn(f"ignoring derived-architecture cache {path}: not a {SCHEMA} file for this config and these library "
             "versions; rebuilding it")
        return None
    try:
        spec_from_dict(doc["spec"], "check", "check")
    except (KeyError, TypeError, ValueError) as e:
        warn(f"ignoring derived-architecture cache {path}: malformed spec ({e.__class__.__name__}); rebuilding it")
        return None
    return doc


def save(cfg: dict, doc: dict) -> None:
    """Write atomically; a cache that cannot be written is a warning (the estimate still has its answer)."""
    path = path_for(cfg)
    doc = dict(doc, schema=SCHEMA, versions=versions(), config_hash=config_hash(cfg))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        warn(f"cannot write the derived-architecture cache {path} ({e.strerror or e}); it will be derived again")


# ----------------------------------------------------------------------------------- ModelSpec <-> JSON

def spec_to_dict(spec: ModelSpec) -> dict:
    def lin(x: Linear) -> list:
        return [x.name, x.in_features, x.out_features, x.bias, x.quantizable]

    return {
        "hidden_size": spec.hidden_size, "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
        "layers": [{"count": n, "linears": [lin(x) for x in layer.linears], "norm_params": layer.norm_params,
                    "expert_params": layer.expert_params, "router_params": layer.router_params,
                    "num_experts": layer.num_experts, "experts_per_token": layer.experts_per_token,
                    "expert_intermediate": layer.expert_intermediate, "mlp": layer.mlp}
                   for n, layer in spec.layers],
        "embedding_params": spec.embedding_params, "lm_head_params": spec.lm_head_params,
        "other_params": spec.other_params, "other_linears": [lin(x) for x in spec.other_linears],
        "tie_word_embeddings": spec.tie_word_embeddings,
    }


def spec_from_dict(d: dict, name: str, source: str, cfg: dict | None = None) -> ModelSpec:
    def lin(x: list) -> Linear:
        n, i, o, b, q = x
        return Linear(str(n), int(i), int(o), bool(b), bool(q))

    layers = tuple(
        (int(g["count"]), LayerSpec(
            linears=tuple(lin(x) for x in g["linears"]), norm_params=int(g["norm_params"]),
            expert_params=int(g["expert_params"]), router_params=int(g["router_params"]),
            num_experts=int(g["num_experts"]), experts_per_token=int(g["experts_per_token"]),
            expert_intermediate=int(g["expert_intermediate"]), mlp=str(g["mlp"])))
        for g in d["layers"])
    cfg = cfg or {}
    return ModelSpec(
        name=name, model_type=cfg.get("model_type", "derived"), source=source, hidden_size=int(d["hidden_size"]),
        num_heads=int(d["num_heads"]), num_kv_heads=int(d["num_kv_heads"]), head_dim=int(d["head_dim"]),
        vocab_size=int(d["vocab_size"]), layers=layers, embedding_params=int(d["embedding_params"]),
        lm_head_params=int(d["lm_head_params"]), other_params=int(d["other_params"]),
        other_linears=tuple(lin(x) for x in d["other_linears"]), tie_word_embeddings=bool(d["tie_word_embeddings"]),
        hf_config=dict(cfg), derived=True,
    )
