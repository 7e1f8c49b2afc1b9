"""Measured vs predicted: the analytic estimate (memplan.estimate) and the meta trace (memplan.trace) of the same
configuration, with the error in % = (predicted - measured) / measured * 100 (positive: the prediction is high).

What is compared with what:
  CUDA  tensor bytes: estimate.peak_bytes and the trace's peak vs torch.cuda.max_memory_allocated (peak phase);
        device total: estimate.device_total_bytes vs NVML used minus the baseline before CUDA initialization.
  CPU   tensor bytes: estimate.peak_bytes and the trace's peak vs the live-bytes tracker's peak (the trace's own
        counter on real tensors); no device total (RSS includes the interpreter and the libraries).
  --gpus N  rank 0's figures (memplan.profile.multi) vs the estimate's per-rank figures and the rank trace
        (memplan.trace.distributed: rank 0 on a fake process group, meta tensors).
"""
from __future__ import annotations


def pct(predicted, measured):
    if predicted is None or not measured:
        return None
    return round((predicted - measured) / measured * 100.0, 3)


def measured(profile: dict) -> tuple[int | None, int | None, dict]:
    """(tensor peak bytes, device total bytes or None, {phase: tensor bytes}) of a profile."""
    meas = profile["measurements"]
    cuda = profile["run"].get("device") == "cuda"
    key = "allocated_peak_bytes" if cuda else "tracker_peak_bytes"
    raw = {k: v[key] for k, v in meas.get("phases", {}).items() if v.get(key) is not None}
    # a prediction's phase covers every step (the trace runs two; the estimate's steady state has optimizer
    # states): compare it with the higher of the first step's phase and the same phase of the later steps
    phases = {k: max(v, raw.get(f"steady_{k}", 0)) for k, v in raw.items()
              if not k.startswith("steady")}
    if "steady" in raw:
        phases["steady"] = raw["steady"]
    peak = (meas.get("peak") or {}).get("bytes")
    total = (meas.get("peak") or {}).get("nvml_process_bytes") if cuda else None
    return peak, total, phases


def compare(job: dict, profile: dict, with_trace: bool | None = None) -> dict:
    from memplan.profile.runner import _model_spec, _train_spec

    spec, train = _model_spec(job), _train_spec(job["train"])
    peak, total, phases = measured(profile)
    out = {"measured": {"peak_bytes": peak, "device_total_bytes": total, "phases": phases}}
    oom = profile.get("status") == "oom"
    from memplan.errors import MemplanError
    from memplan.estimate import estimate

    try:
        est = estimate(spec, train)
        e = {"peak_bytes": est.peak_bytes, "device_total_bytes": est.device_total_bytes, "phases": dict(est.phases),
             "components": dict(est.components)}
        if not oom:
            e["error_pct"] = pct(e["peak_bytes"], peak)
            e["device_total_error_pct"] = pct(e["device_total_bytes"], total)
            e["phase_error_pct"] = {k: pct(v, phases.get(k)) for k, v in e["phases"].items() if k in phases}
        out["estimate"] = e
    except MemplanError as exc:
        out["estimate"] = {"note": f"estimate failed: {exc}"[:500]}
    if with_trace is None:
        with_trace = job.get("trace", True)
    if with_trace:
        try:
            from memplan.trace import run_trace

            kwargs = dict(job.get("trace_kwargs") or {})
            if train.strategy != "none":  # rank 0 of N on a fake process group, meta tensors
                from memplan.trace.distributed import run_rank_trace, traceable

                why = traceable(train)
                if why:
                    raise MemplanError(why)
                kwargs = {}
                tr = run_rank_trace(spec, train, keep_timeline=False)
            else:
                tr = run_trace(spec, train, real=False, **kwargs)
            t = {"peak_bytes": tr.peak_bytes, "phases": dict(tr.phases), "kwargs": kwargs, "peak_phase": tr.peak_phase}
            if not oom:
                t["error_pct"] = pct(tr.peak_bytes, peak)
                t["phase_error_pct"] = {k: pct(v, phases.get(k)) for k, v in t["phases"].items() if k in phases}
            out["trace"] = t
        except MemplanError as exc:  # configurations the meta trace cannot run (docs/trace.md): a note, not a crash
            out["trace"] = {"note": f"trace failed: {exc}"[:500]}
    return out


def attach(job: dict, profile: dict) -> None:
    """profile["comparison"] = compare(job, profile), or a note saying why not: a prediction that fails (or is
    interrupted) must not lose the measurement it would be compared with."""
    try:
        profile["comparison"] = compare(job, profile)
    except KeyboardInterrupt:
        profile["comparison"] = {"note": "interrupted"}
    except Exception as e:  # noqa: BLE001
        profile["comparison"] = {"note": f"comparison failed: {e.__class__.__name__}: {e}"[:500]}
