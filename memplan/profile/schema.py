"""The profile file: one JSON document per run, schema-versioned, written atomically, read defensively.

Profiles are JSON only (never pickle). `write_profile` writes a temporary file in the same folder and renames it
into place (os.replace), so an interrupted or killed run leaves either the whole file or nothing. `read_profiles`
checks the schema version and skips, with a one-line warning naming the file, anything corrupted or foreign.
The fields are documented in docs/profile.md.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

SCHEMA = "memplan.profile/1"
STATUSES = ("ok", "oom", "error", "interrupted")
DONE = ("ok", "oom")  # results that a resumed grid does not run again (an OOM is a result)
REQUIRED = ("schema", "key", "created", "status", "model", "train", "run", "measurements", "environment")


def profile_key(model_name: str, hf_config: dict, train: dict, device: str, run: dict | None = None) -> str:
    """What makes two runs "the same configuration": model (name and architecture), settings and device, plus the
    run options that change what is measured (steps, CPU budget, memory fraction, load path, weights folder)."""
    run = run or {}
    relevant = {k: run.get(k) for k in ("steps", "cpu_budget_bytes", "memory_fraction", "load_path", "weights_dir")}
    blob = json.dumps({"model": model_name, "config": hf_config, "train": train, "device": device, "run": relevant},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def profile_filename(model_name: str, device: str, key: str, created: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in model_name.split("/")[-1]).strip("-").lower()
    stamp = created.replace("-", "").replace(":", "").replace("+0000", "").replace("Z", "")[:15]
    return f"{slug or 'model'}_{device}_{key[:12]}_{stamp}.json"


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write `data` as JSON to `path` atomically: temporary file in the same folder, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False, allow_nan=False, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _jsonable(obj):
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def validate(data) -> str | None:
    """None if `data` is a valid memplan.profile/1 document, else why not (one line)."""
    if not isinstance(data, dict):
        return "not a JSON object"
    schema = data.get("schema")
    if schema != SCHEMA:
        return f"schema {schema!r} is not {SCHEMA!r}"
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        return f"missing fields: {', '.join(missing)}"
    if data["status"] not in STATUSES:
        return f"unknown status {data['status']!r}"
    for k in ("model", "train", "run", "measurements", "environment"):
        if not isinstance(data[k], dict):
            return f"field {k!r} is not an object"
    if not isinstance(data["model"].get("name"), str) or not isinstance(data["model"].get("hf_config"), dict):
        return "model needs name and hf_config"
    if not isinstance(data["measurements"].get("phases"), dict):
        return "measurements.phases is not an object"
    return None


def read_profile(path: str | Path) -> dict | None:
    """One profile, or None (with a one-line warning on stderr) if it is unreadable, corrupted or foreign."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        _warn(path, f"unreadable ({e.__class__.__name__})")
        return None
    except json.JSONDecodeError as e:
        _warn(path, f"corrupted JSON (line {e.lineno} column {e.colno})")
        return None
    problem = validate(data)
    if problem:
        _warn(path, problem)
        return None
    data["_path"] = str(path)
    return data


def read_profiles(folder: str | Path) -> list[dict]:
    """Every valid profile in `folder` (not recursive), oldest first; others are skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        data = read_profile(path)
        if data is not None:
            out.append(data)
    out.sort(key=lambda d: d.get("created", ""))
    return out


def done_keys(folder: str | Path) -> dict[str, dict]:
    """Profiles whose result is final (ok or oom), by key: what a resumed grid skips."""
    return {p["key"]: p for p in read_profiles(folder) if p["status"] in DONE}


def _warn(path: Path, why: str) -> None:
    print(f"memplan: skipping {path}: {why}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ the CSV log

CSV_COLUMNS = [
    # (column, unit / meaning) -- docs/profile.md lists them
    "created", "key", "status", "model", "device", "gpu", "bits", "quant_type", "double_quant", "compute_dtype",
    "method", "lora_r", "lora_targets", "optimizer", "batch_size", "seq_len", "gradient_checkpointing",
    "attention", "steps", "peak_phase", "measured_peak_bytes", "allocated_peak_bytes", "reserved_peak_bytes",
    "nvml_used_peak_bytes", "cuda_context_bytes", "tracker_peak_bytes", "rss_peak_bytes", "estimate_peak_bytes",
    "estimate_error_pct", "trace_peak_bytes", "trace_error_pct", "oom_phase", "oom_requested_bytes",
    "step_time_s", "tokens_per_s", "profile",
]


def csv_row(profile: dict, path: str | Path | None = None) -> dict:
    train, meas, env = profile["train"], profile["measurements"], profile["environment"]
    peak = meas.get("peak") or {}
    cmp_ = profile.get("comparison") or {}
    est, tr = cmp_.get("estimate") or {}, cmp_.get("trace") or {}
    oom = profile.get("oom") or {}
    gpu = (env.get("gpus") or [{}])[0].get("name", "") if profile["run"].get("device") == "cuda" else ""
    targets = train.get("lora_targets")
    row = {
        "created": profile["created"], "key": profile["key"][:12], "status": profile["status"],
        "model": profile["model"]["name"], "device": profile["run"].get("device"), "gpu": gpu,
        **{k: train.get(k) for k in ("bits", "quant_type", "double_quant", "compute_dtype", "method", "lora_r",
                                     "optimizer", "batch_size", "seq_len", "gradient_checkpointing", "attention")},
        "lora_targets": "+".join(targets) if isinstance(targets, list) else targets,
        "steps": profile["run"].get("steps"),
        "peak_phase": peak.get("phase"), "measured_peak_bytes": peak.get("bytes"),
        "allocated_peak_bytes": peak.get("allocated_bytes"), "reserved_peak_bytes": peak.get("reserved_bytes"),
        "nvml_used_peak_bytes": peak.get("nvml_used_bytes"), "cuda_context_bytes": meas.get("cuda_context_bytes"),
        "tracker_peak_bytes": peak.get("tracker_bytes"), "rss_peak_bytes": peak.get("rss_bytes"),
        "estimate_peak_bytes": est.get("peak_bytes"), "estimate_error_pct": est.get("error_pct"),
        "trace_peak_bytes": tr.get("peak_bytes"), "trace_error_pct": tr.get("error_pct"),
        "oom_phase": oom.get("phase"), "oom_requested_bytes": oom.get("requested_bytes"),
        "step_time_s": meas.get("steady_step_time_s"), "tokens_per_s": meas.get("tokens_per_s"),
        "profile": str(path or profile.get("_path") or ""),
    }
    return {k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS}


def append_csv(csv_path: str | Path, row: dict) -> None:
    """Append one row under an exclusive lock (fcntl.flock), writing the header if the file is new/empty.
    Two processes appending at once each write whole rows."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    with open(csv_path, "a+", newline="") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
