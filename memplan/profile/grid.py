"""The parent side: one child process per configuration, resumable grids, the CSV log, Ctrl-C handling.

`run_grid` runs each (model, TrainSpec) in `python -m memplan.profile.child JOB.json`, so an OOM or a CUDA fault
cannot poison the next configuration. Configurations whose final result (ok or oom) is already in the profiles
folder (same key: model, settings, device, run options) are skipped unless force=True. Ctrl-C is forwarded once
to the running child, which writes what it measured (status "interrupted"); the grid then stops.
A child that dies without writing (killed, segfault, host OOM killer) leaves no profile: the grid reports it as
"crashed" (and logs a CSV row saying so) and goes on with the next configuration.

Robustness (docs/profile.md, "Interrupted and concurrent runs"):
* the child dies with the parent (prctl PR_SET_PDEATHSIG on Linux, and a parent-pid check before it writes), so
  a grid killed outright (SIGKILL, a closed terminal, a job scheduler) leaves no orphan that would later write a
  profile the resumed grid also writes;
* each configuration runs under an exclusive lock on its key (schema.key_lock), and whether it is done is checked
  again once the lock is held: two grids started at once over the same profiles folder never run (or log) the
  same configuration twice; a configuration another grid is running is put off to the end, then waited for;
* the CSV row of every profile a grid finds already done is (re)logged, deduplicated by run: a grid killed
  between its child writing a profile and its logging the row leaves the row to the next call, never twice.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from memplan.profile.schema import (CSV_COLUMNS, append_csv, clean_stale_tmp, csv_row, done_keys, done_profile,
                                    key_lock, profile_filename, profile_key, read_profile)


@dataclass
class Config:
    model_name: str
    hf_config: dict
    source: str
    train: dict  # TrainSpec.to_dict()
    device: str
    run: dict  # steps, load_path, weights_dir, weights_cache, cpu_budget_bytes, memory_fraction, seed, ...
    key: str = ""
    label: str = ""

    def __post_init__(self):
        self.run = {"device": self.device, **self.run}
        if not self.key:
            self.key = profile_key(self.model_name, self.hf_config, self.train, self.device, self.run)


@dataclass
class Outcome:
    config: Config
    status: str  # ok | oom | error | interrupted | crashed | skipped | timeout
    profile: dict | None = None
    path: str | None = None
    seconds: float = 0.0
    returncode: int | None = None
    log_tail: list = field(default_factory=list)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class GridInterrupted(Exception):
    pass


def run_one(cfg: Config, profiles_dir: Path, *, timeout_s: float | None = None, on_event=None,
            log_dir: Path | None = None, trace: bool = True, trace_kwargs: dict | None = None,
            trust_remote_code: bool = False, threads: int | None = None, python: str | None = None) -> Outcome:
    """Run one configuration in a child process; returns its outcome (never raises for the child's failures,
    raises KeyboardInterrupt after the child has finished writing if the user pressed Ctrl-C)."""
    created = _now()
    out_path = profiles_dir / profile_filename(cfg.model_name, cfg.device, cfg.key, created)
    job = {"key": cfg.key, "created": created, "device": cfg.device,
           "model": {"name": cfg.model_name, "hf_config": cfg.hf_config, "source": cfg.source},
           "train": cfg.train, "run": cfg.run, "output": str(out_path), "trace": trace,
           "trace_kwargs": trace_kwargs or {}, "trust_remote_code": trust_remote_code, "threads": threads,
           "parent_pid": os.getpid()}  # the child exits without writing once this process is gone
    profiles_dir.mkdir(parents=True, exist_ok=True)
    fd, job_path = tempfile.mkstemp(prefix="memplan-job-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(job, f)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_f = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_f = open(log_dir / (out_path.stem + ".log"), "w")
    tail: deque = deque(maxlen=60)
    t0 = time.perf_counter()
    proc = subprocess.Popen([python or sys.executable, "-m", "memplan.profile.child", job_path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1,
                            start_new_session=True)  # Ctrl-C reaches the parent only; it forwards one SIGINT

    def reader():
        for line in proc.stdout:
            if log_f:
                log_f.write(line)
            if line.startswith("@memplan "):
                try:
                    ev = json.loads(line[len("@memplan "):])
                except json.JSONDecodeError:
                    continue
                if on_event:
                    on_event(ev)
            else:
                tail.append(line.rstrip("\n")[-400:])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    if on_event:
        on_event({"event": "started", "pid": proc.pid, "output": str(out_path)})
    interrupted = timed_out = False
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if timeout_s is not None and time.perf_counter() - t0 > timeout_s and not timed_out:
                    timed_out = True
                    proc.send_signal(signal.SIGTERM)  # the child records what it measured as "interrupted"
                    try:
                        rc = proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        rc = proc.wait()
                    break
            except KeyboardInterrupt:
                interrupted = True
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                try:
                    rc = proc.wait(timeout=120)
                except (subprocess.TimeoutExpired, KeyboardInterrupt):
                    proc.kill()
                    rc = proc.wait()
                break
    finally:
        t.join(timeout=5)
        if log_f:
            log_f.close()
        try:
            os.unlink(job_path)
        except OSError:
            pass
    seconds = time.perf_counter() - t0
    profile = read_profile(out_path) if out_path.is_file() else None
    if profile is not None:
        status = "timeout" if timed_out and profile["status"] == "interrupted" else profile["status"]
        outcome = Outcome(cfg, status, profile, str(out_path), seconds, rc, list(tail))
    else:
        outcome = Outcome(cfg, "crashed", None, None, seconds, rc, list(tail))
    if interrupted:
        raise GridInterrupted(outcome)
    return outcome


def crashed_row(cfg: Config, outcome: Outcome) -> dict:
    t = cfg.train
    row = {k: "" for k in CSV_COLUMNS}
    row.update({"created": _now(), "key": cfg.key[:12], "status": "crashed", "model": cfg.model_name,
                "device": cfg.device, "steps": cfg.run.get("steps"),
                **{k: t.get(k) for k in ("bits", "quant_type", "double_quant", "compute_dtype", "method",
                                         "lora_r", "optimizer", "batch_size", "seq_len",
                                         "gradient_checkpointing", "attention")},
                "gpus": t.get("gpus") or 1, "parallel": t.get("parallel") or "auto"})
    return row


def run_grid(configs: list[Config], profiles_dir: str | Path, csv_path: str | Path | None, *, force: bool = False,
             timeout_s: float | None = None, time_budget_s: float | None = None, progress: bool = True,
             on_outcome=None, log_dir: str | Path | None = None, **child_kwargs) -> list[Outcome]:
    """Run every configuration not already measured; returns the outcomes in order (skipped ones included)."""
    profiles_dir = Path(profiles_dir)
    clean_stale_tmp(profiles_dir)  # temporary files of writers killed mid-write
    done = {} if force else done_keys(profiles_dir)
    todo, outcomes = [], []
    for cfg in configs:
        if cfg.key in done:
            outcomes.append(Outcome(cfg, "skipped", done[cfg.key], done[cfg.key].get("_path")))
            _record(outcomes[-1], csv_path)  # a no-op unless an earlier grid died before logging it
        else:
            todo.append(cfg)
    bar = _Progress(len(todo), enabled=progress and bool(todo))
    start = time.perf_counter()
    durations: list[tuple[str, float]] = []
    results: dict[int, Outcome] = {}
    queue = [(i, cfg, False) for i, cfg in enumerate(todo)]  # (position, config, wait for its lock)
    stop = False
    try:
        while queue and not stop:
            i, cfg, wait = queue.pop(0)
            if time_budget_s is not None:
                elapsed = time.perf_counter() - start
                same = [d for c, d in durations if c == cfg.model_name]
                # the last run of the same model predicts this one; else the longest so far
                expect = same[-1] if same else max((d for _, d in durations), default=0.0)
                if elapsed + expect > time_budget_s:
                    bar.log(f"time budget: {elapsed:.0f} s used of {time_budget_s:.0f} s; "
                            f"not starting the {len(queue) + 1} remaining configuration(s)")
                    for j, rest, _ in [(i, cfg, wait)] + queue:
                        results[j] = Outcome(rest, "not-run")
                    queue = []
                    break
            if wait:
                bar.start(f"{cfg.label or cfg.model_name}: waiting for the other grid running it")
            with key_lock(profiles_dir, cfg.key, blocking=wait) as held:
                if not held:  # another grid is running this configuration: do the others first, then wait
                    queue.append((i, cfg, True))
                    continue
                prev = None if force else done_profile(profiles_dir, cfg.key)
                if prev is not None:  # another grid finished it meanwhile
                    outcome = Outcome(cfg, "skipped", prev, prev.get("_path"))
                    _record(outcome, csv_path)
                    results[i] = outcome
                    bar.done(outcome)
                    continue
                bar.start(cfg.label or cfg.model_name)
                limit = timeout_s
                if time_budget_s is not None:
                    left = time_budget_s - (time.perf_counter() - start)
                    limit = left if limit is None else min(limit, left)
                try:
                    outcome = run_one(cfg, profiles_dir, timeout_s=limit, on_event=bar.event,
                                      log_dir=Path(log_dir) if log_dir else None, **child_kwargs)
                except GridInterrupted as gi:
                    outcome = gi.args[0]
                    _record(outcome, csv_path)
                    results[i] = outcome
                    stop = True
                else:
                    durations.append((cfg.model_name, outcome.seconds))
                    _record(outcome, csv_path)  # under the key's lock: a concurrent grid sees the row with the file
                    results[i] = outcome
            if on_outcome:
                on_outcome(outcome)
            if stop:
                bar.log("interrupted: kept what was measured; the rest of the grid is not run")
                for j, rest, _ in queue:
                    results[j] = Outcome(rest, "not-run")
                outcomes += [results[j] for j in sorted(results)]
                raise KeyboardInterrupt from None
            bar.done(outcome)
    finally:
        bar.close()
    outcomes += [results[j] for j in sorted(results)]
    return outcomes


def _record(outcome: Outcome, csv_path) -> None:
    if csv_path is None:
        return
    if outcome.profile is not None:
        append_csv(csv_path, csv_row(outcome.profile, outcome.path))
    elif outcome.status == "crashed":
        append_csv(csv_path, crashed_row(outcome.config, outcome))


class _Progress:
    """A rich progress bar with ETA over configurations; the running child's phase in the description."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.p = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                              transient=False, redirect_stdout=False, redirect_stderr=False)
            self.p.start()
            self.task = self.p.add_task("profiling", total=total)
        self.label = ""

    def start(self, label: str) -> None:
        self.label = label
        if self.p:
            self.p.update(self.task, description=f"{label}: starting")

    def event(self, ev: dict) -> None:
        if not self.p:
            return
        if ev.get("event") == "phase":
            self.p.update(self.task, description=f"{self.label}: {ev.get('phase')}")
        elif ev.get("event") == "step":
            self.p.update(self.task, description=f"{self.label}: step {ev.get('step')}/{ev.get('steps')}")
        elif ev.get("event") == "status":
            self.p.update(self.task, description=f"{self.label}: {ev.get('text')}")

    def done(self, outcome: Outcome) -> None:
        if self.p:
            self.p.advance(self.task)
            self.p.console.print(f"  {outcome.config.label or outcome.config.model_name}: {outcome.status} "
                                 f"({outcome.seconds:.1f} s)")

    def log(self, text: str) -> None:
        if self.p:
            self.p.console.print(text)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.p:
            self.p.stop()
            self.p = None
