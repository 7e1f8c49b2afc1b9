"""Where a result's numbers come from: the memplan version, the calibration, and the library stack it describes.

The estimate imports no library of the training stack: its formulas follow the code paths of the versions
DESIGN.md lists as checked (each formula cites its library file and version), so that is the stack it names. A
result that carries its own stack (a trace or a profile ran the real libraries) names the versions it ran.
"""
from __future__ import annotations

# The versions the estimate's formulas were checked against by exact traces (DESIGN.md "Known facts",
# reports/estimate_vs_trace.csv); a result with a "stack" key of its own (memplan --transformers 4|5) wins.
MODELLED_STACK = {"torch": "2.13", "transformers": "5.24", "peft": "0.21.2", "bitsandbytes": "0.50.2"}
MODELLED_SOURCE = ("the code paths the estimate's formulas follow, checked by exact traces on these versions "
                   "(DESIGN.md; reports/estimate_vs_trace.csv)")


def stack(result: dict) -> dict:
    """{"libraries": {name: version}, "source": why} for an estimate's to_dict()."""
    own = result.get("stack") or result.get("versions")
    if isinstance(own, dict) and own:
        return {"libraries": {k: v for k, v in own.items() if isinstance(v, (str, int, float))},
                "source": "carried by the result"}
    return {"libraries": dict(MODELLED_STACK), "source": MODELLED_SOURCE}


def installed_stack() -> dict:
    """The versions installed here: what a trace run in this process used."""
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"libraries": out, "source": "installed in the environment that ran the trace"}
