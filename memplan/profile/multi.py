"""Multi-GPU profiles (`memplan profile --gpus N`): one process per rank, launched as torchrun launches them.

The profile's child process (memplan.profile.child) becomes the launcher for a configuration with gpus > 1:
- it writes the random-weight checkpoint once (the ranks then load it as users load a downloaded model);
- it starts N workers, `python -m memplan.profile.multi JOB.json`, with torch.distributed's environment as
  torchrun sets it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT=a free
  port); accelerate launch starts its processes the same way (it calls torch.distributed.run);
- each worker runs the single-process profile's run (memplan.profile.runner.run_job) as its rank: the same load,
  recipe, optimizer and steps, with the model wrapped after the recipe and the process group initialized with
  NCCL on CUDA (rank r on cuda:LOCAL_RANK, torch.cuda max_memory_allocated/reserved per phase) or gloo on the
  CPU (the CPU tracker's live bytes per phase, as the single-process CPU profile);
- the launcher merges the ranks into one profile: `measurements` are rank 0's (what the comparison, the CSV and
  `--show` read), `ranks` holds every rank's status and per-phase peaks, `run.parallel` the job's layout.

Wrapping, as accelerate wraps (accelerate 1.x utils/fsdp_utils.py fsdp2_prepare_model):
- fsdp / fsdp-grad-op: FSDP2 `fully_shard` per decoder layer, the embeddings, the [norm, lm_head] tail, then the
  root (memplan.trace.distributed._fully_shard: the rank trace wraps with the same function, so the two are
  comparable byte for byte); --offload params adds FSDP2's CPUOffloadPolicy (CUDA only);
- ddp: torch DistributedDataParallel with its defaults;
- zero1/2/3 (CUDA only): DeepSpeed's engine (deepspeed.initialize with a ZeRO config built from the flags:
  stage, offload_optimizer / offload_param to the CPU, micro-batch, bf16/fp16 as the compute dtype).
FSDP1 is not profiled (the FSDP2 path is what accelerate's fsdp_version 2 and the trace run).

Failures are results. A rank that runs out of memory or raises writes its own record and exits; the launcher then
stops the other ranks (they would wait in a collective for ever): SIGTERM, which each rank records as
"interrupted" keeping what it measured, then SIGKILL after a grace period. A rank killed before it could write
is rebuilt from the per-phase lines it printed as it went. The profile's status is the cause's: an OOM, else a rank
killed from outside (status "killed"; its peers then fail in their collectives), else an error, else
"interrupted", with the rank named in `oom` / `error`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GRACE_S = 15.0  # after a rank fails: how long the others get to record what they measured before SIGKILL
RANK_EVENT = "rank_phase"  # the per-phase line a worker prints (the launcher's copy of what a rank measured)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the rendezvous (as torchrun's --master-port 0 would pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def why_not(train, device: str, visible_gpus: int | None = None) -> str | None:
    """Why this multi-GPU configuration cannot be profiled here (None when it can): one line."""
    s = train.strategy
    if s == "none":
        return None
    if s.startswith("zero"):
        if device != "cuda":
            return (f"--parallel {s}: DeepSpeed's ZeRO engine needs CUDA (its optimizer and communication run on "
                    "the GPU); profile it on a GPU machine, or profile --parallel fsdp / ddp on the CPU")
        try:
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                return f"--parallel {s} profiles with DeepSpeed's engine: pip install deepspeed"
        except (ImportError, ValueError):
            return f"--parallel {s} profiles with DeepSpeed's engine: pip install deepspeed"
    elif s.startswith("fsdp") and train.fsdp_version == 1:
        return ("--fsdp-version 1: the profile runs FSDP2 (fully_shard), as the rank trace does; FSDP1 is estimated "
                "only")
    if train.offload != "none" and device != "cuda":
        return "--offload moves GPU memory to the host: it means nothing with --device cpu"
    if device == "cuda" and visible_gpus is not None and train.gpus > visible_gpus:
        return f"--gpus {train.gpus}: only {visible_gpus} GPU(s) visible here (one process per GPU)"
    return None


# --------------------------------------------------------------------------------------------- the launcher

def launch(job: dict) -> dict:
    """Run one multi-GPU configuration: N rank processes, merged into one profile (written to job["output"])."""
    from memplan.profile.runner import _now, _sigterm, emit, recipe_dtype, _train_spec
    from memplan.profile.schema import SCHEMA, write_json_atomic

    signal.signal(signal.SIGTERM, _sigterm)
    train = _train_spec(job["train"])
    n, device = train.gpus, job["device"]
    run = dict(job["run"])
    run["parallel"] = {"gpus": n, "strategy": train.strategy, "backend": backend(device),
                       "launcher": "memplan (torchrun-style: one process per rank, env://)",
                       "fsdp_version": train.fsdp_version if train.strategy.startswith("fsdp") else None,
                       "offload": train.offload}
    profile = {"schema": SCHEMA, "key": job["key"], "created": job.get("created") or _now(), "status": "error",
               "model": {"name": job["model"]["name"], "source": job["model"].get("source"),
                         "hf_config": job["model"]["hf_config"]},
               "train": job["train"], "run": run, "measurements": {"phases": {}}, "ranks": [],
               "oom": None, "error": None, "comparison": {}, "environment": {}}
    workdir = Path(tempfile.mkdtemp(prefix="memplan-ranks-"))
    results: dict[int, dict] = {}
    interrupted = False
    try:
        weights_dir = run.get("weights_dir")
        if run.get("load_path", "pretrained") == "pretrained" and not weights_dir:
            emit("status", text="writing random-weight checkpoint")
            t0 = time.perf_counter()
            from memplan.profile.weights import write_random_checkpoint

            weights_dir = str(write_random_checkpoint(job["model"]["hf_config"], recipe_dtype(train),
                                                      run.get("weights_cache"),
                                                      trust_remote_code=job.get("trust_remote_code", False)))
            profile["measurements"]["random_checkpoint_seconds"] = round(time.perf_counter() - t0, 3)
        results, interrupted = _run_ranks(job, n, device, weights_dir, workdir)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:  # noqa: BLE001 - the launcher's own failure is recorded, never raised past the profile
        profile["error"] = {"type": e.__class__.__name__, "message": str(e)[:2000], "phase": "launch"}
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:  # a second Ctrl-C must not cut the profile's writing
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    merge(profile, results, n)
    if interrupted and not results:  # stopped before any rank ran (e.g. while writing the checkpoint)
        profile["status"] = "interrupted"
    if profile["status"] in ("ok", "oom") and job.get("compare", True):
        from memplan.profile.compare import attach

        attach(job, profile)
    try:
        from memplan.profile.env import environment

        profile["environment"] = environment(device)
    except Exception as e:  # noqa: BLE001
        profile["environment"] = {"note": f"environment query failed: {e.__class__.__name__}: {e}"[:300]}
    profile["finished"] = _now()
    if job.get("output"):
        from memplan.profile.child import orphaned

        if orphaned(job):
            emit("orphaned", path=job["output"])
            return profile
        write_json_atomic(job["output"], profile)
        emit("written", path=job["output"], status=profile["status"])
    return profile


def _run_ranks(job: dict, n: int, device: str, weights_dir: str | None, workdir: Path) -> tuple[dict, bool]:
    """Start the N workers, watch them, stop the others when one fails: ({rank: what it measured}, whether this
    process was interrupted)."""
    port = free_port()
    procs, outputs, streams, readers = [], {}, {}, []
    root = str(Path(__file__).resolve().parents[2])
    base_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                    GROUP_RANK="0", ROLE_RANK="0", TORCHELASTIC_RUN_ID="memplan")
    base_env["PYTHONPATH"] = root + (os.pathsep + base_env["PYTHONPATH"] if base_env.get("PYTHONPATH") else "")
    try:
        _start(job, n, device, weights_dir, workdir, base_env, procs, outputs, streams, readers)
    except KeyboardInterrupt:  # stopped while starting: the ranks already started record what they measured
        stop(procs)
        return _collect(outputs, streams, procs), True
    from memplan.profile.runner import emit

    emit("ranks", pids=[p.pid for p in procs])  # for tools that watch the ranks (the tests kill one)
    interrupted = False
    try:
        supervise(procs)
    except KeyboardInterrupt:  # the ranks were stopped and have written what they measured
        interrupted = True
    finally:
        for t in readers:
            t.join(timeout=5)
    return _collect(outputs, streams, procs), interrupted


def _collect(outputs: dict, streams: dict, procs: list) -> dict[int, dict]:
    return {rank: _rank_record(rank, out, streams[rank], procs[rank].returncode,
                               getattr(procs[rank], "memplan_stopped", False)) for rank, out in outputs.items()}


def _start(job, n, device, weights_dir, workdir, base_env, procs, outputs, streams, readers) -> None:
    """Start the N rank processes (appending to procs, outputs, streams and readers as each starts)."""
    for rank in range(n):
        out = workdir / f"rank{rank}.json"
        run = dict(job["run"])
        if weights_dir:
            run["weights_dir"] = weights_dir  # the checkpoint the launcher wrote (or the user's --weights)
        rank_job = {**job, "run": run, "output": str(out), "compare": False, "parent_pid": os.getpid(),
                    "dist": {"rank": rank, "world_size": n, "local_rank": rank, "backend": backend(device)}}
        path = workdir / f"job{rank}.json"
        path.write_text(json.dumps(rank_job))
        env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
        proc = subprocess.Popen([sys.executable, "-m", "memplan.profile.multi", str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, text=True, bufsize=1, start_new_session=True)
        procs.append(proc)
        outputs[rank] = out
        streams[rank] = {"phases": {}, "tail": []}
        readers.append(threading.Thread(target=_read, args=(proc, rank, streams[rank]), daemon=True))
        readers[-1].start()


def _read(proc, rank: int, stream: dict) -> None:
    """A worker's output: rank 0's progress lines go on to the grid; every rank's per-phase records are kept."""
    from memplan.profile.runner import emit

    for line in proc.stdout:
        if line.startswith("@memplan "):
            try:
                ev = json.loads(line[len("@memplan "):])
            except json.JSONDecodeError:
                continue
            if ev.get("event") == RANK_EVENT:
                stream["phases"][ev["phase"]] = ev["record"]
            elif rank == 0 and ev.get("event") in ("phase", "step", "status"):
                emit(ev.pop("event"), **ev)
        else:
            stream["tail"] = (stream["tail"] + [line.rstrip("\n")[-400:]])[-40:]


def supervise(procs: list, grace_s: float = GRACE_S, poll_s: float = 0.1) -> None:
    """Wait for every process; when one exits with a failure (non-zero status) or this process is interrupted,
    SIGTERM the others (each rank records what it measured as "interrupted"), then SIGKILL those still running
    after `grace_s` (a rank blocked in a collective cannot run its signal handler)."""
    stopping_at = None
    interrupted = False
    try:
        while True:
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                break
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed and stopping_at is None:
                stopping_at = time.monotonic()
                for p in alive:
                    _signal(p, signal.SIGTERM)
            if stopping_at is not None and time.monotonic() - stopping_at > grace_s:
                for p in alive:
                    _signal(p, signal.SIGKILL)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        interrupted = True
        stop(procs, grace_s)
    if interrupted:
        raise KeyboardInterrupt


def stop(procs: list, grace_s: float = GRACE_S) -> None:
    """SIGTERM every running process, SIGKILL those still running after grace_s; wait for all."""
    for p in procs:
        if p.poll() is None:
            _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            p.wait()


def _signal(proc, sig) -> None:
    proc.memplan_stopped = True  # stopped by the launcher: not the cause of the run's end (_rank_record)
    with contextlib.suppress(ProcessLookupError, OSError):
        proc.send_signal(sig)


def _rank_record(rank: int, out: Path, stream: dict, returncode, stopped: bool = False) -> dict:
    """What one rank measured: its own profile document if it wrote one, else what its per-phase lines said
    (status "interrupted" if the launcher stopped it, "killed" if something else ended it: a root cause)."""
    from memplan.profile.schema import read_json_validated

    data = read_json_validated(out, lambda d: None if isinstance(d, dict) and "measurements" in d else "no "
                               "measurements") if out.is_file() else None
    if data is not None:
        meas = data["measurements"]
        return {"rank": rank, "status": data["status"], "phases": meas.get("phases") or {},
                "peak": meas.get("peak"), "oom": data.get("oom"), "error": data.get("error"),
                "measurements": meas, "returncode": returncode}
    phases = stream["phases"]
    return {"rank": rank, "status": "interrupted" if stopped else "killed", "phases": phases, "peak": None,
            "oom": None, "error": {"type": "RankKilled", "message": f"rank {rank} exited with status {returncode} "
                                   "without writing its record; last output: " + " | ".join(stream["tail"][-5:])},
            "measurements": None, "returncode": returncode}


def merge(profile: dict, results: dict[int, dict], n: int) -> None:
    """Rank 0's measurements as the profile's; every rank under `ranks`; the worst rank's status."""
    ranks = []
    for rank in range(n):
        rec = results.get(rank)
        if rec is None:
            continue
        ranks.append({"rank": rank, "status": rec["status"], "phases": rec["phases"], "peak": rec["peak"],
                      "oom": rec["oom"], "error": rec["error"]})
    profile["ranks"] = ranks
    if not results:
        return
    zero = results.get(0) or {}
    meas = zero.get("measurements")
    if meas is not None:
        profile["measurements"] = {**meas, **{k: v for k, v in profile["measurements"].items()
                                              if k == "random_checkpoint_seconds"}}
    else:
        profile["measurements"]["phases"] = zero.get("phases") or {}
    key = "allocated_peak_bytes" if profile["run"]["device"] == "cuda" else "tracker_peak_bytes"
    peaks = [(r["phases"].get(p, {}).get(key) or 0, -r["rank"], p) for r in ranks for p in r["phases"]
             if not p.startswith("steady_")]
    if peaks:
        b, rank, phase = max(peaks)
        rank = -rank  # the lowest rank among equals
        profile["measurements"]["largest_rank_peak"] = {"rank": rank, "phase": phase, "bytes": b, "measure": key}
    statuses = [r["status"] for r in ranks]
    # the cause first: an OOM, then a rank killed from outside (its peers then fail in their collectives), then an
    # error, then ranks the launcher stopped
    for status in ("oom", "killed", "error", "interrupted"):
        if status in statuses:
            first = next(r for r in ranks if r["status"] == status)
            profile["status"] = "error" if status == "killed" else status
            if status == "oom":
                profile["oom"] = {**(first["oom"] or {}), "rank": first["rank"]}
            elif status in ("error", "killed"):
                profile["error"] = {**(first["error"] or {"type": "RankFailed", "message": ""}),
                                    "rank": first["rank"]}
            break
    else:
        if len(ranks) == n and all(s == "ok" for s in statuses):
            profile["status"] = "ok"


# ---------------------------------------------------------------------------------------------- one rank

class Rank:
    """One rank's part of memplan.profile.runner._measure: the process group, the wrapping, the step."""

    def __init__(self, job: dict, train):
        d = job["dist"]
        self.rank, self.world_size, self.local_rank = int(d["rank"]), int(d["world_size"]), int(d["local_rank"])
        self.backend = d["backend"]
        self.train = train
        self.device = job["device"]
        self.engine = None

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.local_rank}" if self.device == "cuda" else "cpu"

    def init(self) -> None:
        import datetime

        import torch
        import torch.distributed as dist

        if self.device == "cuda":
            torch.cuda.set_device(self.local_rank)
        kw = {"device_id": torch.device(self.torch_device)} if self.device == "cuda" else {}
        dist.init_process_group(self.backend, init_method="env://", rank=self.rank, world_size=self.world_size,
                                timeout=datetime.timedelta(minutes=30), **kw)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    def wrap(self, model, tracker):
        """The model as each strategy's wrapper holds it (see the module docstring)."""
        s = self.train.strategy
        if s in ("fsdp", "fsdp-grad-op"):
            from memplan.trace.distributed import _fully_shard

            with _offload_policy(self.train.offload == "params"):
                _fully_shard(model, self.train)
            return model
        if s == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            kw = {"device_ids": [self.local_rank]} if self.device == "cuda" else {}
            if tracker is None:
                return DistributedDataParallel(model, **kw)
            # its Reducer allocates the gradient buckets here: counted, as the rank trace counts them
            tracker.default_category = "comm_buffers"
            try:
                with tracker:
                    return DistributedDataParallel(model, **kw)
            finally:
                tracker.default_category = "temporaries"
        return model  # zero*: deepspeed.initialize wraps model and optimizer together (make_engine)

    def make_engine(self, model, optimizer, train):
        """DeepSpeed's engine over the model and the recipe's optimizer (ZeRO stage and offload from the flags)."""
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                          config=deepspeed_config(train), dist_init_required=False)
        self.engine = engine
        return engine, ds_optimizer

    def train_step(self, model, optimizer, input_ids, on_phase, step_context, train, fused_loss):
        """One step: the recipe's step, or DeepSpeed's forward / engine.backward / engine.step."""
        from memplan import recipe

        if self.engine is None:
            return recipe.train_step(model, optimizer, input_ids, on_phase, step_context, train, fused_loss)
        engine = self.engine
        on_phase("forward")
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        on_phase("backward")
        engine.backward(loss)
        value = loss.detach()
        del loss
        on_phase("optimizer")
        engine.step()
        return value

    def step_context(self, tracker):
        """FSDP2 resizes its buffers' storages in place (no ATen op sees it): the rank trace's bookkeeping of
        those resizes, so that the CPU tracker counts them as the trace does."""
        if tracker is not None and self.train.strategy.startswith("fsdp"):
            from memplan.trace.distributed import _comm_labels

            return _comm_labels(tracker)
        return contextlib.nullcontext()


def deepspeed_config(train) -> dict:
    """The DeepSpeed config for --parallel zero1|zero2|zero3 (--offload optimizer: ZeRO-Offload of the optimizer
    states; params: also ZeRO-3's parameter offload), as accelerate's DeepSpeed plugin writes it: one micro-batch per
    GPU, no accumulation, bf16 / fp16 mixed precision as the compute dtype. The recipe's torch optimizer is kept
    (zero_force_ds_cpu_optimizer off: with offload DeepSpeed would otherwise insist on its DeepSpeedCPUAdam)."""
    zero = {"stage": int(train.strategy[-1])}
    if train.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if train.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    mixed = train.bits != 32
    return {"train_micro_batch_size_per_gpu": train.batch_size, "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "bf16": {"enabled": mixed and train.compute_dtype == "bf16"},
            "fp16": {"enabled": mixed and train.compute_dtype == "fp16"}}


@contextlib.contextmanager
def _offload_policy(enabled: bool):
    """FSDP2 CPU offload: every fully_shard call of the wrapping gets offload_policy=CPUOffloadPolicy()."""
    if not enabled:
        yield
        return
    import functools

    import torch.distributed.fsdp as fsdp

    saved = fsdp.fully_shard
    fsdp.fully_shard = functools.partial(saved, offload_policy=fsdp.CPUOffloadPolicy())
    try:
        yield
    finally:
        fsdp.fully_shard = saved


def worker_main(argv: list[str] | None = None) -> int:
    """One rank: `python -m memplan.profile.multi JOB.json` with torchrun's environment."""
    from memplan.profile.child import main as child_main

    return child_main(argv)


if __name__ == "__main__":
    sys.exit(worker_main())
