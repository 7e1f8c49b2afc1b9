"""Measured vs predicted: the analytic estimate (memplan.estimate) and the meta trace (memplan.trace) of the same
configuration, with the error in % = (predicted - measured) / measured * 100 (positive: the prediction is high).

What is compared with what:
  CUDA  tensor bytes: estimate.peak_bytes and the trace's peak vs torch.cuda.max_memory_allocated (peak phase);
        device total: estimate.device_total_bytes vs NVML used minus the baseline before CUDA initialization.
  CPU   tensor bytes: estimate.peak_bytes and the trace's peak vs the live-bytes tracker's peak (the trace's own
        counter on real tensors); no device total (RSS includes the interpreter and the libraries).
"""
from __future__ import annotations


def pct(predicted, measured):
    if predicted is None or not measured:
        return None
    return round((predicted - measured) / measured * 100.0, 3)


def _phase_bytes(value):
    """A phase entry of an estimate or trace: bytes, or an object/dict holding them."""
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, dict):
        for k in ("peak_bytes", "bytes", "total_bytes", "peak"):
            if isinstance(value.get(k), (int, float)):
                return int(value[k])
        return None
    for k in ("peak_bytes", "bytes", "total_bytes"):
        v = getattr(value, k, None)
        if isinstance(v, (int, float)):
            return int(v)
    return None


def _phases(obj) -> dict:
    phases = getattr(obj, "phases", None)
    if phases is None and isinstance(obj, dict):
        phases = obj.get("phases") or obj.get("phase_peaks")
    if phases is None:
        phases = getattr(obj, "phase_peaks", None)
    out = {}
    if isinstance(phases, dict):
        items = phases.items()
    elif isinstance(phases, (list, tuple)):
        items = [(getattr(p, "name", None) or (p.get("name") if isinstance(p, dict) else None), p) for p in phases]
    else:
        items = []
    for name, value in items:
        b = _phase_bytes(value)
        if name and b is not None:
            out[str(name)] = b
    return out


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
    try:
        from memplan.estimate import estimate

        est = estimate(spec, train)
        e = {"peak_bytes": int(est.peak_bytes), "device_total_bytes": getattr(est, "device_total_bytes", None),
             "phases": _phases(est), "components": dict(getattr(est, "components", {}) or {})}
        if not oom:
            e["error_pct"] = pct(e["peak_bytes"], peak)
            e["device_total_error_pct"] = pct(e["device_total_bytes"], total)
            e["phase_error_pct"] = {k: pct(v, phases.get(k)) for k, v in e["phases"].items() if k in phases}
        out["estimate"] = e
    except ImportError as exc:
        out["estimate"] = {"note": f"estimate unavailable ({exc})"}
    except Exception as exc:  # noqa: BLE001
        out["estimate"] = {"note": f"estimate failed: {exc.__class__.__name__}: {exc}"[:500]}
    if with_trace is None:
        with_trace = job.get("trace", True)
    if with_trace:
        try:
            from memplan.trace import run_trace

            kwargs = dict(job.get("trace_kwargs") or {})
            tr = run_trace(spec, train, real=False, **kwargs)
            d = tr.to_dict() if hasattr(tr, "to_dict") else {}
            t_peak = getattr(tr, "peak_bytes", None)
            if t_peak is None:
                t_peak = d.get("peak_bytes")
            t = {"peak_bytes": t_peak, "phases": _phases(tr) or _phases(d), "kwargs": kwargs,
                 "peak_phase": getattr(tr, "peak_phase", None) or d.get("peak_phase")}
            if not oom:
                t["error_pct"] = pct(t_peak, peak)
                t["phase_error_pct"] = {k: pct(v, phases.get(k)) for k, v in t["phases"].items() if k in phases}
            out["trace"] = t
        except ImportError as exc:
            out["trace"] = {"note": f"trace unavailable ({exc})"}
        except Exception as exc:  # noqa: BLE001
            out["trace"] = {"note": f"trace failed: {exc.__class__.__name__}: {exc}"[:500]}
    return out
