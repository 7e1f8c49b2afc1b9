"""Device-level memory that no tensor accounts for: the CUDA context, the cuBLAS workspace, and the caching
allocator's reserved-but-unallocated bytes. Figures come from overhead.json (each with its source) until a
calibration fitted from measured GPU profiles replaces them (`memplan calibrate`; memplan/calibrate.py builds
an Overheads from a calibration file, docs/calibration.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class Overheads:
    cuda_context: int
    cublas_workspace: int
    allocator_fraction: float  # reserved - allocated, as a fraction of the tensor peak
    source: str
    # a calibration's allocator model is reserved = (1 + allocator_fraction) * allocated + allocator_intercept
    allocator_intercept: int = 0
    calibration: str | None = None  # the calibration's name (None: the defaults below)

    def device_bytes(self, tensor_peak: int) -> dict[str, int]:
        return {
            "cuda_context": self.cuda_context,
            "cublas_workspace": self.cublas_workspace,
            "allocator_overhead": max(0, int(self.allocator_fraction * tensor_peak + self.allocator_intercept)),
        }


@lru_cache(maxsize=None)
def default_overheads() -> Overheads:
    d = json.loads((Path(__file__).parent / "overhead.json").read_text())
    return Overheads(d["cuda_context_bytes"], d["cublas_workspace_bytes"], d["allocator_fraction"],
                     "default, not calibrated (overhead.json)")


@lru_cache(maxsize=None)
def _replay_fit() -> dict | None:
    path = Path(__file__).parent / "allocator_replay.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=None)
def replay_overheads(model_type: str) -> Overheads:
    """The defaults, with the allocator overhead replaced by the fraction fitted on replays of traced steps of this
    model type (allocator_replay.json, scripts/fit_allocator_overhead.py; the pooled fraction for a model type that
    was not fitted). Without that file: the flat default."""
    base = default_overheads()
    fit = _replay_fit()
    if not fit:
        return base
    arch = fit.get("architectures", {}).get(model_type)
    which = f"{model_type} (n={arch['default']['n']}" if arch else \
        f"all model types ({model_type} not fitted; n={fit['all']['default']['n']}"
    fraction = (arch or fit["all"])["default"]["fraction"]
    return Overheads(base.cuda_context, base.cublas_workspace, fraction,
                     f"default, not calibrated: allocator overhead {fraction:.1%} of the tensor peak, fitted on "
                     f"caching-allocator replays of traced {which}, seed {fit.get('seed')}; allocator_replay.json)")
