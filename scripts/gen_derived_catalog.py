"""Regenerate memplan/catalog/derived.json: the derived specs of the catalog models that have no hand-written
builder (memplan/derive), and their activation terms for the default training settings, so that `memplan models`,
`memplan params` and a default `memplan estimate` of those models need no torch. Other settings are fitted on
first use and cached (memplan/derive/cache.py).

    python scripts/gen_derived_catalog.py       # a few minutes: 8 meta traces per model
    python scripts/gen_derived_catalog.py deepseek-v2-lite   # only these; the others' entries are kept
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "memplan" / "catalog" / "derived.json"


def main() -> int:
    import os
    import tempfile

    os.environ["MEMPLAN_DERIVED_CACHE"] = tempfile.mkdtemp(prefix="memplan-derived-")  # fit afresh
    from memplan import derive
    from memplan.architectures import BUILDERS
    from memplan.catalog import models, resolve_model
    from memplan.catalog.hfconfig import read_config
    from memplan.derive import cache
    from memplan.spec import TrainSpec

    derive.SHIPPED_DISABLED = True
    only = set(sys.argv[1:])
    entries = json.loads(OUT.read_text())["models"] if only and OUT.is_file() else {}
    for entry in models().values():
        cfg, _ = read_config(entry["config"], entry["name"])
        if cfg["model_type"] in BUILDERS or (only and entry["name"] not in only):
            continue
        spec = resolve_model(entry["name"])
        derive.activation_terms(spec, TrainSpec())
        doc = cache.load(cfg)
        entries[cache.config_hash(cfg)] = {"name": entry["name"], "spec": doc["spec"],
                                           "activations": doc["activations"]}
        print(f"{entry['name']}: {spec.total_params:,} parameters", file=sys.stderr)
    data = {"about": "Derived specs (memplan/derive) of the catalog models without a hand-written builder, and "
                     "their activation terms for the default training settings, keyed by config hash. Generated "
                     "by scripts/gen_derived_catalog.py; do not edit.",
            "versions": cache.versions(), "schema": cache.SCHEMA, "models": entries}
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: {len(entries)} models, {cache.versions()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
