"""The exact trace: one real QLoRA/LoRA training step (transformers + PEFT + bitsandbytes) run on meta tensors,
every live tensor byte counted by memplan.trace.tracker.LiveBytesTracker (shared with memplan.profile).

    from memplan.trace import run_trace
    result = run_trace(model_spec, train_spec)          # TraceResult; result.to_dict() is `trace --json`

Importing this package does not import torch; run_trace does.
"""
from __future__ import annotations


def run_trace(model, train, *, real: bool = False, **kwargs):
    """Trace one training step of `model` (ModelSpec) with `train` (TrainSpec); see memplan.trace.runner."""
    from memplan.trace.runner import run_trace as _run

    return _run(model, train, real=real, **kwargs)


__all__ = ["run_trace"]
