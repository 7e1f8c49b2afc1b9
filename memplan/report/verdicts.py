"""Every catalog GPU's verdict for one estimate: memory, headroom, fits; shared by `memplan serve` and
`memplan report --html` (the same figures `memplan estimate` and `memplan gpus` print)."""
from __future__ import annotations

from memplan.errors import MemplanError
from memplan.spec import TRAIN_FIELDS, TrainSpec

GPU_COUNTS = (1, 2, 4, 8)


def gpu_verdicts(model, spec: TrainSpec, est, overheads) -> list[dict]:
    """Every catalog GPU with its headroom (commands/estimate.py gpu_verdicts, what `memplan gpus` prints). Once
    TrainSpec has the multi-GPU field `gpus` (issue #13: per-rank estimates), each GPU also gets the fewest GPUs of
    GPU_COUNTS on which every rank's device total fits (None: not even 8), from an estimate per count."""
    from memplan.commands.estimate import gpu_verdicts as verdicts
    from memplan.estimate import estimate

    rows = [{"name": g.name, "kind": g.kind, "memory_bytes": g.memory_bytes, "headroom_bytes": room,
             "fits": room >= 0, "source": g.source} for g, room in verdicts(est.device_total_bytes)]
    if "gpus" not in TRAIN_FIELDS:
        return rows
    per_count = {}
    for n in GPU_COUNTS:
        try:
            per_count[n] = estimate(model, spec.with_(gpus=n), overheads).device_total_bytes
        except MemplanError:  # a layout that needs another count (e.g. a parallel mode for N > 1 only)
            continue
    for r in rows:
        r["min_gpus"] = next((n for n, total in per_count.items() if total <= r["memory_bytes"]), None)
        r["min_gpus_device_total_bytes"] = per_count.get(r["min_gpus"])
    return rows
