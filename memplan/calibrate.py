"""Calibration: fit, from measured GPU profiles, the device overheads that neither the formulas nor the meta trace
can see, and hand them to the estimate (docs/calibration.md).

The device model the estimate uses (memplan/estimate/overhead.py):

    device total = tensor peak + CUDA context + workspaces outside the allocator + allocator overhead(tensor peak)
    allocator overhead(T) = reserved(T) - T,  reserved(T) = slope * T + intercept

and what each term is fitted from, per GPU (each profile: memplan.profile/1, run.device "cuda", status "ok"):

    CUDA context     median of measurements.cuda_context_bytes (NVML used after torch.cuda.init() and a first
                     tensor, minus NVML used before CUDA was initialized, minus the allocator's first segment)
    allocator        least squares of peak.reserved_bytes (max_memory_reserved) on peak.allocated_bytes
                     (max_memory_allocated), one point per profile; residuals reported
    workspaces       median of peak.nvml_process_bytes - peak.reserved_bytes - cuda_context_bytes: device memory
                     outside PyTorch's caching allocator and the context (cuBLAS/cuBLASLt/cuDNN handles and
                     workspaces not taken from the allocator, other libraries' own allocations)

Pure Python (no numpy): `memplan estimate` loads a calibration on every run, so loading is one small JSON read,
chosen by file name and cached.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from memplan.errors import MemplanError

SCHEMA = "memplan.calibration/1"
ENV_DIR = "MEMPLAN_CALIBRATIONS"
_STAMP = re.compile(r"_(\d{8}T\d{6}Z)$")
OVERHEAD_KEYS = ("cuda_context_bytes", "cublas_workspace_bytes", "allocator_fraction", "allocator_intercept_bytes")


def calibration_dir() -> Path:
    """Where calibrations are kept: $MEMPLAN_CALIBRATIONS, else $XDG_CONFIG_HOME/memplan/calibrations
    (~/.config/memplan/calibrations)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "memplan" / "calibrations"


def slug(name: str) -> str:
    out = re.sub(r"[^a-z0-9.]+", "-", name.lower().replace("nvidia", "")).strip("-.")
    return out or "gpu"


# ------------------------------------------------------------------------------------------------- the fit

def gpu_of(profile: dict) -> dict:
    """The GPU a CUDA profile was measured on: NVML name, catalog name, total bytes, capability."""
    env = profile.get("environment") or {}
    g = (env.get("gpus") or [{}])[0] or {}
    dev = env.get("device") or {}
    name = g.get("name") or dev.get("name") or "unknown GPU"
    return {"name": name, "catalog": g.get("catalog"), "total_bytes": g.get("total_bytes") or dev.get("total_bytes"),
            "compute_capability": g.get("compute_capability") or dev.get("capability")}


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Ordinary least squares y = a*x + b. With one point, or all x equal, the slope is fixed at 1."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx <= 0:
        return 1.0, my - mx
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return a, my - a * mx


def _median(values):
    import statistics

    return statistics.median(values)


def _one_or_all(values):
    """One value if all profiles agree, else the sorted distinct values (provenance must not hide a mix)."""
    distinct = sorted({str(v) for v in values if v is not None})
    if not distinct:
        return None
    return distinct[0] if len(distinct) == 1 else distinct


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def fit(profiles: list[dict], defaults=None, created: datetime | None = None) -> dict:
    """One calibration document (memplan.calibration/1) from `ok` CUDA profiles of one GPU."""
    from memplan import __version__
    from memplan.estimate.overhead import default_overheads

    if not profiles:
        raise MemplanError("calibrate: no usable GPU profile")
    defaults = defaults or default_overheads()
    created = created or _now()
    gpu = gpu_of(profiles[0])
    points = []
    for p in profiles:
        meas = p["measurements"]
        peak = meas.get("peak") or {}
        points.append({
            "file": Path(p.get("_path", "")).name, "key": p["key"][:12], "model": p["model"]["name"],
            "created": p["created"], "seq_len": p["train"].get("seq_len"), "batch_size": p["train"].get("batch_size"),
            "bits": p["train"].get("bits"),
            "allocated_peak_bytes": peak.get("allocated_bytes") or peak.get("bytes"),
            "reserved_peak_bytes": peak.get("reserved_bytes"),
            "nvml_process_peak_bytes": peak.get("nvml_process_bytes"),
            "cuda_context_bytes": meas.get("cuda_context_bytes"),
        })
    notes = []

    # CUDA context
    ctx = [q["cuda_context_bytes"] for q in points if isinstance(q["cuda_context_bytes"], (int, float))]
    if ctx:
        context = int(_median(ctx))
        ctx_fit = {"method": "median of measurements.cuda_context_bytes", "n": len(ctx), "min_bytes": min(ctx),
                   "max_bytes": max(ctx), "source": "fitted"}
    else:
        context = defaults.cuda_context
        ctx_fit = {"method": "no profile has cuda_context_bytes (NVML unavailable): default kept", "n": 0,
                   "source": "default (overhead.json)"}
        notes.append("no NVML figures: the CUDA context is the default")

    # caching allocator: reserved = a * allocated + b
    xy = [(q["allocated_peak_bytes"], q["reserved_peak_bytes"]) for q in points
          if q["allocated_peak_bytes"] and q["reserved_peak_bytes"]]
    if not xy:
        raise MemplanError("calibrate: no profile has allocated and reserved peaks (measurements.peak)")
    xs, ys = [float(x) for x, _ in xy], [float(y) for _, y in xy]
    a, b = linear_fit(xs, ys)
    res = [y - (a * x + b) for x, y in zip(xs, ys)]
    rms = math.sqrt(sum(r * r for r in res) / len(res))
    mean_y = sum(ys) / len(ys)
    alloc_fit = {
        "model": "reserved_peak = slope * allocated_peak + intercept (least squares, one point per profile)",
        "slope": round(a, 6), "intercept_bytes": int(round(b)), "n": len(xy),
        "rms_residual_bytes": int(round(rms)), "max_abs_residual_bytes": int(round(max(abs(r) for r in res))),
        "rms_residual_pct": round(100.0 * rms / mean_y, 3) if mean_y else None,
        "allocated_range_bytes": [int(min(xs)), int(max(xs))],
        "source": "fitted",
    }
    if len(xy) < 2 or len(set(xs)) < 2:
        alloc_fit["note"] = "fewer than two distinct allocated peaks: slope fixed at 1, intercept = mean gap"
        notes.append("one allocation size only: the allocator slope is fixed at 1 (profile more sizes)")

    # workspaces and anything else outside the allocator and the context
    ws = [q["nvml_process_peak_bytes"] - q["reserved_peak_bytes"] - q["cuda_context_bytes"] for q in points
          if all(isinstance(q[k], (int, float)) for k in
                 ("nvml_process_peak_bytes", "reserved_peak_bytes", "cuda_context_bytes"))]
    if ws:
        workspace = max(0, int(_median(ws)))
        ws_fit = {"method": "median of peak.nvml_process_bytes - peak.reserved_bytes - cuda_context_bytes "
                            "(device memory outside the caching allocator and the context; clipped at 0)",
                  "n": len(ws), "min_bytes": int(min(ws)), "max_bytes": int(max(ws)), "source": "fitted"}
    else:
        workspace = defaults.cublas_workspace
        ws_fit = {"method": "no NVML peak in the profiles: default kept", "n": 0, "source": "default (overhead.json)"}

    # the whole device model, in sample: measured allocated -> predicted NVML process peak
    errs = []
    for q in points:
        if q["nvml_process_peak_bytes"] and q["allocated_peak_bytes"]:
            t = q["allocated_peak_bytes"]
            pred = t + context + workspace + max(0.0, (a - 1.0) * t + b)
            errs.append(100.0 * (pred - q["nvml_process_peak_bytes"]) / q["nvml_process_peak_bytes"])
    device_fit = {"model": "allocated + context + workspaces + allocator overhead vs NVML process peak (in sample)",
                  "n": len(errs)}
    if errs:
        device_fit["median_abs_error_pct"] = round(_median([abs(e) for e in errs]), 3)
        device_fit["max_abs_error_pct"] = round(max(abs(e) for e in errs), 3)

    envs = [p.get("environment") or {} for p in profiles]
    vers = [e.get("versions") or {} for e in envs]
    stamp = created.strftime("%Y%m%dT%H%M%SZ")
    name = f"{slug(gpu['catalog'] or gpu['name'])}_{stamp}"
    return {
        "schema": SCHEMA,
        "name": name,
        "created": created.isoformat(),
        "gpu": gpu,
        "overheads": {"cuda_context_bytes": int(context), "cublas_workspace_bytes": int(workspace),
                      "allocator_fraction": round(a - 1.0, 6), "allocator_intercept_bytes": int(round(b))},
        "fit": {"cuda_context": ctx_fit, "allocator": alloc_fit, "workspaces": ws_fit, "device_total": device_fit},
        "provenance": {
            "n_profiles": len(profiles),
            "driver": _one_or_all(e.get("driver") for e in envs),
            "cuda_driver": _one_or_all(((e.get("gpus") or [{}])[0] or {}).get("cuda_driver") for e in envs),
            "torch_cuda": _one_or_all(e.get("torch_cuda") for e in envs),
            "versions": {k: _one_or_all(v.get(k) for v in vers)
                         for k in ("torch", "transformers", "peft", "bitsandbytes", "python")},
            "profiled_with_memplan": _one_or_all(v.get("memplan") for v in vers),
            "calibrated_with_memplan": __version__,
            "profiles": points,
        },
        "notes": notes,
        "units": "bytes",
    }


def sort_profiles(profiles: list[dict]) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """CUDA profiles with status ok, by GPU; and how many were left out, by reason."""
    by_gpu: dict[str, list[dict]] = {}
    skipped = {"cpu": 0, "oom": 0, "error": 0, "interrupted": 0, "no_peak": 0}
    for p in profiles:
        if p["run"].get("device") != "cuda":
            skipped["cpu"] += 1
            continue
        if p["status"] != "ok":
            skipped[p["status"]] = skipped.get(p["status"], 0) + 1
            continue
        if not (p["measurements"].get("peak") or {}).get("reserved_bytes"):
            skipped["no_peak"] += 1
            continue
        g = gpu_of(p)
        by_gpu.setdefault(g["catalog"] or g["name"], []).append(p)
    return by_gpu, skipped


def read_profile_args(paths: list[str]) -> tuple[list[dict], int]:
    """Profiles from files and folders (default: profiles/*.json); (valid profiles, files seen)."""
    from memplan.profile.schema import read_profile

    files: list[Path] = []
    for item in paths or ["profiles"]:
        path = Path(item)
        if path.is_dir():
            files += sorted(path.glob("*.json"))
        elif path.is_file():
            files.append(path)
        elif any(c in item for c in "*?["):
            files += sorted(Path().glob(item))
        else:
            raise MemplanError(f"{item}: no such file or folder")
    out = [p for p in (read_profile(f) for f in files) if p is not None]
    return out, len(files)


def calibrate(paths: list[str], out: str | None = None, created: datetime | None = None) -> list[tuple[Path, dict]]:
    """Fit one calibration per GPU found in the profiles, write each (atomically), return (path, document)."""
    from memplan.profile.schema import write_json_atomic

    profiles, seen = read_profile_args(paths)
    by_gpu, skipped = sort_profiles(profiles)
    if not by_gpu:
        where = ", ".join(paths) if paths else "profiles/"
        if not profiles:
            why = f"no valid profile in {where} ({seen} file(s) read)"
        elif skipped["cpu"] == len(profiles):
            why = (f"{len(profiles)} profile(s) read, all from CPU runs (no CUDA figures); "
                   "calibrate needs profiles measured with `memplan profile --device cuda`")
        else:
            why = (f"{len(profiles)} profile(s) read, none a finished CUDA run "
                   f"({', '.join(f'{v} {k}' for k, v in skipped.items() if v)}); OOM runs are not fitted")
        raise MemplanError(f"no GPU profile given: {why}")
    if out and out.endswith(".json") and len(by_gpu) > 1:
        raise MemplanError(f"--out {out}: the profiles come from {len(by_gpu)} GPUs ({', '.join(sorted(by_gpu))}); "
                           "give a folder (one calibration per GPU)")
    created = created or _now()
    written = []
    for _, group in sorted(by_gpu.items()):
        doc = fit(group, created=created)
        doc["provenance"]["excluded"] = {k: v for k, v in skipped.items() if v}
        if out and out.endswith(".json"):
            path = Path(out)
        else:
            path = Path(out or calibration_dir()) / f"{doc['name']}.json"
        if path.suffix == ".json" and path.stem != doc["name"]:
            doc["name"] = path.stem
        problem = validate(doc)
        if problem:  # a fit that would be refused on reading is not written
            raise MemplanError(f"calibrate: {doc['name']}: {problem}")
        write_json_atomic(path, doc)
        written.append((path, doc))
    select.cache_clear()
    return written


# ------------------------------------------------------------------------------------------------ loading

def validate(doc) -> str | None:
    """None if `doc` is a usable memplan.calibration/1 document, else why not (one line)."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.get("schema") != SCHEMA:
        return f"schema {doc.get('schema')!r} is not {SCHEMA!r}"
    for k in ("name", "created", "gpu", "overheads", "provenance"):
        if k not in doc:
            return f"missing field {k!r}"
    ov = doc["overheads"]
    if not isinstance(ov, dict) or not isinstance(doc["gpu"], dict):
        return "overheads and gpu must be objects"
    for k in OVERHEAD_KEYS:
        v = ov.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"overheads.{k} is not a number"
    if ov["cuda_context_bytes"] < 0 or ov["cublas_workspace_bytes"] < 0:
        return "negative context or workspace bytes"
    if not -0.5 < ov["allocator_fraction"] < 2.0:
        return f"allocator_fraction {ov['allocator_fraction']} is implausible"
    return None


def read_calibration(path: str | Path) -> tuple[dict | None, str | None]:
    """(document, None) or (None, why it cannot be used)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable ({e.__class__.__name__})"
    except json.JSONDecodeError as e:
        return None, f"corrupted JSON (line {e.lineno} column {e.colno})"
    problem = validate(doc)
    return (None, problem) if problem else (doc, None)


def describe(doc: dict) -> str:
    """One line of provenance: what overhead_source says for a calibrated estimate."""
    prov, fit_ = doc.get("provenance") or {}, doc.get("fit") or {}
    g = doc["gpu"]
    vers = prov.get("versions") or {}
    parts = [g.get("catalog") or g.get("name") or "unknown GPU", f"{prov.get('n_profiles', '?')} profiles"]
    for label, value in (("driver", prov.get("driver")), ("CUDA", prov.get("torch_cuda")),
                         ("torch", vers.get("torch"))):
        if value:
            parts.append(f"{label} {value if isinstance(value, str) else '/'.join(value)}")
    alloc = fit_.get("allocator") or {}
    if alloc.get("rms_residual_pct") is not None:
        parts.append(f"allocator fit residual {alloc['rms_residual_pct']:.2f}%")
    return f"calibration {doc['name']} ({', '.join(parts)})"


def overheads_from(doc: dict):
    from memplan.estimate.overhead import Overheads

    ov = doc["overheads"]
    return Overheads(int(ov["cuda_context_bytes"]), int(ov["cublas_workspace_bytes"]), float(ov["allocator_fraction"]),
                     describe(doc), allocator_intercept=int(ov["allocator_intercept_bytes"]),
                     calibration=doc["name"])


def _candidates(folder: Path) -> list[Path]:
    """Calibration files, newest first (by the UTC stamp in the name; the file's mtime otherwise)."""
    try:
        files = [p for p in folder.glob("*.json") if p.is_file()]
    except OSError:
        return []

    def when(p: Path):
        m = _STAMP.search(p.stem)
        if m:
            return m.group(1)
        return datetime.fromtimestamp(p.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    return sorted(files, key=lambda p: (when(p), p.name), reverse=True)


@lru_cache(maxsize=None)
def select(folder: str, gpu: str | None = None, explicit: str | None = None, off: bool = False):
    """(Overheads, notes) for an estimate: the explicit calibration, else the newest calibration of `gpu` (a catalog
    GPU name) if given, else the newest calibration; the defaults when there is none or `off`. Corrupted files are
    skipped, each named in a note. Cached: one directory listing and, usually, one small JSON read per process."""
    from memplan.estimate.overhead import default_overheads

    notes: list[str] = []
    if off:
        return default_overheads(), ("calibration off (--no-calibration): uncalibrated defaults",)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            path = Path(folder) / (explicit if explicit.endswith(".json") else f"{explicit}.json")
        if not path.is_file():
            raise MemplanError(f"--calibration {explicit}: no such file, nor a calibration of that name in {folder}")
        doc, why = read_calibration(path)
        if doc is None:
            raise MemplanError(f"--calibration {path}: {why}")
        return overheads_from(doc), ()
    want = slug(gpu) if gpu else None
    for path in _candidates(Path(folder)):
        if want and not path.stem.startswith(want + "_"):
            continue
        doc, why = read_calibration(path)
        if doc is None:
            notes.append(f"ignoring calibration {path}: {why}")
            continue
        if want and slug(doc["gpu"].get("catalog") or doc["gpu"].get("name") or "") != want:
            continue
        return overheads_from(doc), tuple(notes)
    base = default_overheads()
    if gpu:
        notes.append(f"no usable calibration for {gpu} in {folder}: uncalibrated defaults (overhead.json)")
    else:
        notes.append(f"no usable calibration in {folder}: uncalibrated defaults (overhead.json)")
    return base, tuple(notes)


def overheads_for(gpu: str | None = None, explicit: str | None = None, off: bool = False):
    """What `memplan estimate` uses (see select)."""
    return select(str(calibration_dir()), gpu, explicit, off)


def warn(notes) -> None:
    for n in notes:
        if n.startswith("ignoring"):
            print(f"memplan: {n}", file=sys.stderr)
