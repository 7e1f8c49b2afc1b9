"""`memplan models` lists the catalog; `memplan params MODEL` prints exact parameter counts."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("models", help="list the model catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_models)
    q = sub.add_parser("params", help="exact parameter counts of a model (equal to what transformers builds)")
    q.add_argument("model")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_params)


def run_models(args) -> int:
    from memplan.catalog import models, resolve_model

    rows = []
    for entry in models().values():
        spec = resolve_model(entry["name"])
        rows.append({"name": entry["name"], "model_type": spec.model_type, "params": spec.total_params,
                     "layers": spec.num_layers, "hidden": spec.hidden_size, "vocab": spec.vocab_size,
                     "hf_id": entry.get("hf_id"), "aliases": entry.get("aliases", []),
                     "derived": spec.derived})  # spec read off transformers' meta model (memplan/derive)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} catalog models (a config.json path or a cached hub id works too)",
                  title_justify="left")
    for c, j in (("name", "left"), ("type", "left"), ("params", "right"), ("layers", "right"),
                 ("hidden", "right"), ("vocab", "right"), ("hub id", "left")):
        table.add_column(c, justify=j)
    for r in sorted(rows, key=lambda r: (r["model_type"], r["params"])):
        table.add_row(r["name"], r["model_type"] + (" (derived)" if r["derived"] else ""), f"{r['params'] / 1e9:.2f} B", str(r["layers"]), str(r["hidden"]),
                      str(r["vocab"]), r["hf_id"] or "")
    Console().print(table)
    return 0


def run_params(args) -> int:
    from memplan.catalog import resolve_model

    spec = resolve_model(args.model)
    counts = spec.param_counts()
    if args.json:
        json.dump({"model": spec.name, "source": spec.source, "stated_params": spec.stated_params, **counts},
                  sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{spec.name} ({spec.model_type}) · source: {spec.source}", title_justify="left")
    table.add_column("count")
    table.add_column("parameters", justify="right")
    per_layer = sorted(set(counts["per_layer"]))
    for name, value in (("total", counts["total"]), ("embedding", counts["embedding"]), ("lm_head", counts["lm_head"]),
                        ("decoder layers", counts["layers"]), ("quantizable linear weights",
                                                               counts["quantizable_linear_weights"]),
                        ("MoE experts (unquantized 3-D)", counts["experts"]), ("other", counts["other"])):
        table.add_row(name, f"{value:,}")
    table.add_row("per layer", " / ".join(f"{v:,}" for v in per_layer) + f" × {counts['num_layers']} layers")
    if spec.stated_params:
        ok = "matches" if spec.stated_params == counts["total"] else "DIFFERS"
        table.add_row("stated by the publisher", f"{spec.stated_params:,} ({ok})")
    if counts["tie_word_embeddings"]:
        table.add_row("tied embeddings", "lm_head shares embed_tokens (counted once)")
    Console().print(table)
    return 0
