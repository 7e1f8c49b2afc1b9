"""Any architecture transformers can build: a ModelSpec read off its meta model (spec.py) and activation terms
fitted to short meta traces (fit.py), cached as JSON per config and library versions (cache.py).

    derived_spec(cfg, name, source)  -> ModelSpec   (torch only when the cache has no entry)
    activation_terms(model, train)   -> dict        (torch only when the cache has no fit for these settings)

Hand-written builders (memplan/architectures.py) stay where they exist: they are exact and explain more.
"""
from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from memplan.derive import cache
from memplan.errors import MemplanError
from memplan.spec import ModelSpec, TrainSpec

_DOCS: dict[str, dict] = {}  # this process's view of the cache, by file path
SHIPPED_DISABLED = False  # scripts/gen_derived_catalog.py derives afresh


@lru_cache(maxsize=None)
def _shipped_table() -> dict:
    path = Path(__file__).resolve().parent.parent / "catalog" / "derived.json"
    return json.loads(path.read_text()) if path.is_file() else {"models": {}, "versions": {}}


def _shipped(cfg: dict) -> tuple[dict | None, bool]:
    """(the catalog's shipped derivation of this config, whether it was made under the installed versions)."""
    if SHIPPED_DISABLED:
        return None, False
    table = _shipped_table()
    return table["models"].get(cache.config_hash(cfg)), table.get("versions") == cache.versions()


def _doc(cfg: dict) -> dict | None:
    key = str(cache.path_for(cfg))
    if key not in _DOCS:
        doc = cache.load(cfg)
        if doc is None:
            return None
        _DOCS[key] = doc
    return _DOCS[key]


def _store(cfg: dict, doc: dict) -> None:
    _DOCS[str(cache.path_for(cfg))] = doc
    cache.save(cfg, doc)


def _stack() -> str:
    v = cache.versions()
    return ", ".join(f"{k} {v[k]}" for k in cache.STACK if v.get(k))


def derived_spec(cfg: dict, name: str, source: str) -> ModelSpec:
    doc = _doc(cfg)
    where = f"cached in {cache.path_for(cfg)}"
    if doc is None:  # the catalog ships the specs of its derived models (scripts/gen_derived_catalog.py)
        doc = _shipped(cfg)[0]
        where = "shipped in memplan/catalog/derived.json"
    if doc is None:
        where = f"cached in {cache.path_for(cfg)}"
        try:
            from memplan.derive.spec import build_meta, spec_from_model
        except ImportError as e:  # pragma: no cover - torch is a dependency
            raise MemplanError(f"{source}: model_type {cfg.get('model_type')!r} has no hand-written builder and "
                               f"deriving it needs torch and transformers ({e})") from None
        spec = spec_from_model(build_meta(cfg), cfg, name, source)
        doc = {"spec": cache.spec_to_dict(spec), "activations": {}}
        _store(cfg, doc)
    spec = cache.spec_from_dict(doc["spec"], name, source, cfg)
    note = (f"derived architecture: {cfg['model_type']} has no hand-written builder; parameters and linears read "
            f"off the model transformers builds on meta, activations fitted to meta traces ({_stack()}); {where}")
    return replace(spec, notes=(note,))


def activation_terms(model: ModelSpec, train: TrainSpec) -> dict:
    from memplan.derive.fit import activation_key

    cfg = model.hf_config
    key = activation_key(model, train)
    doc = _doc(cfg) or {"spec": cache.spec_to_dict(model), "activations": {}}
    terms = doc.get("activations", {}).get(key)
    shipped, same_stack = _shipped(cfg)
    if terms is None and shipped and same_stack:  # fitted for the catalog under this very stack
        terms = shipped["activations"].get(key)
    if terms is None and train.bits == 8:
        raise MemplanError(f"{model.name}: a derived architecture's activations come from meta traces, and no meta "
                           "trace runs bitsandbytes' 8-bit matmul (its int8 quantization of activations has a "
                           "data-dependent shape); use --bits 4 or 16")
    if terms is None:
        from memplan.derive.fit import fit

        terms = fit(model, train)
        doc = dict(doc, activations={**doc.get("activations", {}), key: terms})
        _store(cfg, doc)
    return terms
