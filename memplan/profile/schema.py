"""The profile file: one JSON document per run, schema-versioned, written atomically, read defensively.

Profiles are JSON only (never pickle). `write_json_atomic` writes a temporary file in the same folder (named with the
writer's pid) and renames it into place (os.replace), so an interrupted or killed run leaves either the whole file
or nothing (a temporary file of a killed writer is removed by the next grid: `clean_stale_tmp`). `read_profile`
checks the schema version, the required fields and their types, and skips, with a one-line warning naming the
file, anything corrupted, truncated, foreign or wrongly typed. The CSV log is appended under a file lock, whole
rows only, at most one row per run (`append_csv`). The fields are documented in docs/profile.md.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = "memplan.profile/1"
STATUSES = ("ok", "oom", "error", "interrupted")
DONE = ("ok", "oom")  # results that a resumed grid does not run again (an OOM is a result)
REQUIRED = ("schema", "key", "created", "status", "model", "train", "run", "measurements", "environment")
DEVICES = ("cpu", "cuda")
MAX_BYTES = 64 * 2**20  # a profile is a few KiB; a bigger "profile" is not read at all


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
    # the writer's pid in the name: clean_stale_tmp removes what a killed writer left, and nothing else
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a profile is as readable as any file the user writes
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


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(folder: str | Path, min_age_s: float = 60.0) -> list[str]:
    """Remove the temporary files (`.NAME.PID.XXXX.tmp`) of writers that are no longer running: a process killed
    between creating its temporary file and renaming it. A live writer's file is left alone, and so is any file
    younger than `min_age_s` (a write takes milliseconds; the age also protects a writer on another host sharing
    the folder, whose PID means nothing here)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        parts = tmp.name.split(".")
        pid = next((int(x) for x in reversed(parts[:-2]) if x.isdigit()), None)
        if pid is None or _pid_alive(pid):
            continue
        try:
            if now - tmp.stat().st_mtime < min_age_s:
                continue
            tmp.unlink()
            removed.append(tmp.name)
        except FileNotFoundError:
            pass
    return removed


@contextlib.contextmanager
def key_lock(folder: str | Path, key: str, blocking: bool = True):
    """An exclusive lock on one configuration key among every process using `folder` (fcntl.flock on
    `folder/.KEY.lock`); yields True if held, False if not blocking and another process holds it. The lock dies
    with its process (even SIGKILL); the file is removed on release (a waiter that locked the removed file
    notices the inode changed and locks the new one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{key[:16]}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                yield False
                return
            raise
        except BaseException:  # Ctrl-C while waiting
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed this file: lock the current one
    try:
        yield True
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def _jsonable(obj):
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _typename(v) -> str:
    return "null" if v is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def _check(value, kind: str, where: str, optional: bool = True) -> str | None:
    """None if `value` is of `kind` (num, int, str, dict, list, bool; null allowed when optional), else why not."""
    if value is None:
        return None if optional else f"{where} is missing or null"
    ok = {"num": _is_num(value), "int": _is_num(value) and float(value).is_integer(),
          "str": isinstance(value, str), "dict": isinstance(value, dict), "list": isinstance(value, list),
          "bool": isinstance(value, bool)}[kind]
    if ok:
        return None
    want = {"num": "a number", "int": "an integer", "str": "a string", "dict": "an object", "list": "a list",
            "bool": "a boolean"}[kind]
    return f"{where} is {_typename(value)}, not {want}"


def _numbers(obj: dict, where: str) -> str | None:
    """Every *_bytes / *_s / *_pct / seconds entry of `obj` is a number or null."""
    for k, v in obj.items():
        if not (k.endswith(("_bytes", "_s", "_pct", "seconds")) or k == "bytes"):
            continue
        if isinstance(v, (dict, list)):  # phase_error_pct {phase: %}, step_times_s [s, ...]
            items = v.items() if isinstance(v, dict) else enumerate(v)
            problem = next((p for p in (_check(x, "num", f"{where}.{k}[{i}]") for i, x in items) if p), None)
        else:
            problem = _check(v, "num", f"{where}.{k}")
        if problem:
            return problem
    return None


def validate(data) -> str | None:
    """None if `data` is a valid memplan.profile/1 document, else why not (one line).

    Checked: the schema string, the required fields and the type of every field the report, the CSV log, the
    resume and --recompare use (so a file that passes cannot break them), and the train settings (a TrainSpec)."""
    if not isinstance(data, dict):
        return f"not a JSON object ({_typename(data)})"
    schema = data.get("schema")
    if schema != SCHEMA:
        return f"schema {schema!r} is not {SCHEMA!r}"
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        return f"missing fields: {', '.join(missing)}"
    for k in ("key", "created"):
        if not isinstance(data[k], str) or not data[k]:
            return f"{k} is {_typename(data[k])}, not a non-empty string"
    if data["status"] not in STATUSES:
        return f"unknown status {data['status']!r}"
    for k in ("model", "train", "run", "measurements", "environment"):
        if not isinstance(data[k], dict):
            return f"field {k!r} is not an object"
    model, run, meas, env = data["model"], data["run"], data["measurements"], data["environment"]
    if not isinstance(model.get("name"), str) or not isinstance(model.get("hf_config"), dict):
        return "model needs name and hf_config"
    checks = [_check(model.get("source"), "str", "model.source"), _check(data.get("finished"), "str", "finished")]
    if run.get("device") not in DEVICES:
        return f"run.device {run.get('device')!r} is not one of {', '.join(DEVICES)}"
    checks += [_check(run.get(k), kind, f"run.{k}") for k, kind in
               (("steps", "int"), ("seed", "int"), ("cpu_budget_bytes", "int"), ("memory_fraction", "num"),
                ("load_path", "str"), ("weights_dir", "str"), ("weights_cache", "str"), ("kernels", "str"))]
    if not isinstance(meas.get("phases"), dict):
        return "measurements.phases is not an object"
    for name, rec in meas["phases"].items():
        checks.append(_check(rec, "dict", f"measurements.phases.{name}", optional=False)
                      or _numbers(rec, f"measurements.phases.{name}"))
    peak = meas.get("peak")
    checks.append(_check(peak, "dict", "measurements.peak"))
    if isinstance(peak, dict):
        checks += [_check(peak.get("phase"), "str", "measurements.peak.phase"), _numbers(peak, "measurements.peak")]
    checks.append(_numbers(meas, "measurements"))
    for k in ("step_times_s", "losses"):
        v = meas.get(k)
        checks.append(_check(v, "list", f"measurements.{k}"))
        if isinstance(v, list):
            checks += [_check(x, "num", f"measurements.{k}[{i}]", optional=(k == "losses")) for i, x in enumerate(v)]
    checks += [_check(meas.get(k), "num", f"measurements.{k}") for k in ("tokens_per_step", "trainable_params")]
    checks.append(_check(env.get("gpus"), "list", "environment.gpus"))
    if isinstance(env.get("gpus"), list):
        checks += [_check(g, "dict", f"environment.gpus[{i}]", optional=False) for i, g in enumerate(env["gpus"])]
    checks.append(_check(env.get("versions"), "dict", "environment.versions"))
    checks.append(_check(run.get("parallel"), "dict", "run.parallel"))
    ranks = data.get("ranks")  # a multi-GPU profile (memplan/profile/multi.py): every rank's figures
    checks.append(_check(ranks, "list", "ranks"))
    for i, r in enumerate(ranks if isinstance(ranks, list) else ()):
        where = f"ranks[{i}]"
        problem = _check(r, "dict", where, optional=False)
        if problem is None:
            problem = (_check(r.get("rank"), "int", f"{where}.rank", optional=False)
                       or _check(r.get("status"), "str", f"{where}.status", optional=False)
                       or _check(r.get("phases"), "dict", f"{where}.phases", optional=False))
        for name, rec in (r["phases"].items() if problem is None else ()):
            problem = problem or _check(rec, "dict", f"{where}.phases.{name}", optional=False) \
                or _numbers(rec, f"{where}.phases.{name}")
        checks.append(problem)
    for k in ("oom", "error", "comparison"):
        checks.append(_check(data.get(k), "dict", k))
    err = data.get("error")
    if isinstance(err, dict):
        checks += [_check(err.get("type"), "str", "error.type", optional=False),
                   _check(err.get("message"), "str", "error.message", optional=False)]
    oom = data.get("oom")
    if isinstance(oom, dict):
        checks += [_check(oom.get("phase"), "str", "oom.phase"), _numbers(oom, "oom")]
    cmp_ = data.get("comparison")
    if isinstance(cmp_, dict):
        for k in ("measured", "estimate", "trace"):
            part = cmp_.get(k)
            checks.append(_check(part, "dict", f"comparison.{k}"))
            if isinstance(part, dict):
                checks.append(_numbers(part, f"comparison.{k}"))
                ph = part.get("phases")
                checks.append(_check(ph, "dict", f"comparison.{k}.phases"))
                if isinstance(ph, dict):
                    checks += [_check(v, "num", f"comparison.{k}.phases.{n}") for n, v in ph.items()]
    problem = next((c for c in checks if c), None)
    if problem:
        return problem
    return _check_train(data["train"])


def _check_train(train: dict) -> str | None:
    """The train settings must make a TrainSpec (what --recompare and the comparison build from them)."""
    from memplan.spec import TrainSpec

    d = dict(train)
    if isinstance(d.get("lora_targets"), list):
        d["lora_targets"] = tuple(d["lora_targets"])
    if isinstance(d.get("modules_to_save"), list):
        d["modules_to_save"] = tuple(d["modules_to_save"])
    try:
        TrainSpec(**d)
    except TypeError as e:
        return f"train: {e}".replace("TrainSpec.__init__() ", "")[:200]
    except Exception as e:  # noqa: BLE001 - TrainSpec's own checks (MemplanError, ValueError)
        return f"train: {e}"[:200]
    return None


def read_profile(path: str | Path) -> dict | None:
    """One profile, or None (with a one-line warning on stderr) if it is unreadable, corrupted or foreign."""
    data = read_json_validated(path, validate)
    if data is not None:
        data["_path"] = str(path)
    return data


def read_json_validated(path: str | Path, check=validate, max_bytes: int = MAX_BYTES) -> dict | None:
    """A schema-versioned JSON file (a profile; any other memplan data file, such as a calibration, with its own
    `check(data) -> None | why`), or None after a one-line warning naming the file when it is unreadable, empty,
    too large, corrupted or truncated, not standard JSON (NaN/Infinity), foreign or wrongly typed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            _warn(path, f"too large ({size} bytes)")
            return None
        if size == 0:
            _warn(path, "empty file")
            return None
        data = json.loads(path.read_text(), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError) as e:
        _warn(path, f"unreadable ({e.__class__.__name__})")
        return None
    except json.JSONDecodeError as e:
        _warn(path, f"corrupted or truncated JSON (line {e.lineno} column {e.colno})")
        return None
    except ValueError as e:  # NaN / Infinity: never written by memplan (allow_nan=False)
        _warn(path, str(e))
        return None
    except RecursionError:
        _warn(path, "corrupted JSON (nested too deeply)")
        return None
    try:
        problem = check(data)
    except Exception as e:  # noqa: BLE001 - a validator tripping on odd data is still a bad file, not a crash
        problem = f"invalid ({e.__class__.__name__}: {e})"
    if problem:
        _warn(path, problem)
        return None
    return data


def _no_constant(name: str):
    raise ValueError(f"not standard JSON ({name})")


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


def done_profile(folder: str | Path, key: str) -> dict | None:
    """The final (ok/oom) profile of one key in `folder`, if any: only the files named with that key are read."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [p for p in (read_profile(f) for f in sorted(folder.glob(f"*_{key[:12]}_*.json")))
             if p is not None and p["key"] == key and p["status"] in DONE]
    return max(found, key=lambda p: p["created"]) if found else None


def _warn(path: Path, why: str) -> None:
    why = " ".join(str(why).split())  # always one line
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
    # multi-GPU (--gpus N): the measured peak above is rank 0's; the largest of every rank's peaks
    "gpus", "parallel", "largest_rank_peak_bytes",
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
        "gpus": train.get("gpus") or 1, "parallel": (profile["run"].get("parallel") or {}).get("strategy") or "none",
        "largest_rank_peak_bytes": (meas.get("largest_rank_peak") or {}).get("bytes"),
    }
    return {k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS}


def row_id(row: dict) -> tuple[str, str]:
    """What identifies one run's row: the configuration key (12 hex digits) and the run's creation time."""
    return str(row.get("key") or ""), str(row.get("created") or "")


def append_csv(csv_path: str | Path, row: dict, dedupe: bool = True) -> bool:
    """Append one row under an exclusive lock (fcntl.flock), writing the header if the file is new or empty.
    Returns whether a row was written.

    * Two processes appending at once each write whole rows (one os.write of the encoded row, under the lock).
    * A torn last line (a writer killed mid-write on a filesystem where that can happen) is cut off first, so the
      file never holds a partial row (the header included: a torn header is written again).
    * With `dedupe` (the default), a row whose run (row_id: key and created) is already in the file is not written
      again: a resumed or concurrent grid re-logging a profile adds nothing."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(csv_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open(fd, "rb", closefd=False) as f:
            content = f.read()
        if content and not content.endswith(b"\n"):
            keep = content.rfind(b"\n") + 1
            os.ftruncate(fd, keep)
            content = content[:keep]
        if dedupe and content:
            want = row_id({k: ("" if v is None else str(v)) for k, v in row.items()})
            reader = csv.DictReader(io.StringIO(content.decode("utf-8", "replace")))
            if any(row_id(r) == want for r in reader):
                return False
        # a file written before columns were added keeps its own header: the row is written in its columns
        columns = next(csv.reader(io.StringIO(content.decode("utf-8", "replace")))) if content else CSV_COLUMNS
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n").writerow(row)
        line = buf.getvalue().encode()
        if not content:
            head = io.StringIO()
            csv.DictWriter(head, fieldnames=CSV_COLUMNS, lineterminator="\n").writeheader()
            line = head.getvalue().encode() + line
        os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(line)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
        return True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
