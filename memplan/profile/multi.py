"""Multi-GPU profiles (`memplan profile --gpus N`): one process per rank through `accelerate launch`, as users run
these fine-tunes.

The profile's child process (memplan.profile.child) becomes the launcher for a configuration with a strategy
(--gpus N, or --gpus 1 --parallel fsdp / zero3 with offload):
- it writes the random-weight checkpoint once (the ranks then load it as users load a downloaded model);
- it writes an accelerate config file from the flags (memplan.profile.accelerate_config: FSDP with fsdp_version 2,
  MULTI_GPU, DEEPSPEED) and one job file, keeps both in the profile (run.launch: the command, the config, the
  accelerate version) and runs `accelerate launch --config_file F -m memplan.profile.rank JOB.json`;
- each rank (memplan/profile/rank.py) runs the single-process profile's run (memplan.profile.runner.run_job)
  with its own Accelerator(): the same load, recipe, optimizer and steps, the model and optimizer through
  accelerator.prepare, NCCL on CUDA (rank r on cuda:LOCAL_RANK, torch.cuda max_memory_allocated/reserved per
  phase) or gloo on the CPU (the CPU tracker's live bytes per phase, as the single-process CPU profile);
- the launcher merges the ranks into one profile: `measurements` are rank 0's (what the comparison, the CSV and
  `--show` read), `ranks` holds every rank's status and per-phase peaks, `run.parallel` the job's layout.

What accelerate launch does (accelerate 1.15, read in its source):
- commands/launch.py launch_command: FSDP, MULTI_GPU and DEEPSPEED (one machine) all end in
  torch.distributed.run (multi_gpu_launcher / deepspeed_launcher call distrib_run.run in the accelerate process,
  which becomes torchrun's elastic agent): N processes `python -m MODULE ARGS` with RANK, LOCAL_RANK, WORLD_SIZE,
  LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT (main_process_port 0: a free port, utils/launch.py
  prepare_multi_gpu_env), plus ACCELERATE_MIXED_PRECISION and ACCELERATE_USE_FSDP, FSDP_VERSION,
  FSDP_RESHARD_AFTER_FORWARD, FSDP_OFFLOAD_PARAMS, FSDP_AUTO_WRAP_POLICY, FSDP_TRANSFORMER_CLS_TO_WRAP, ... (FSDP)
  or ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, ACCELERATE_DEEPSPEED_OFFLOAD_*_DEVICE (DeepSpeed),
  OMP_NUM_THREADS. use_cpu in the config file does not change the launcher (only the `--cpu` flag does) and
  sets no ACCELERATE_USE_CPU for torchrun's processes.
- distributed_type MULTI_CPU (or `--cpu`) takes the simple launcher instead (prepare_simple_launcher_cmd_env):
  one process, ACCELERATE_USE_CPU=True, or mpirun with a hostfile; one machine without MPI gets one process, so
  the CPU runs here use the torchrun path (MULTI_GPU / FSDP with use_cpu true).
- state.py PartialState: on CUDA, LOCAL_RANK set -> MULTI_GPU, init_process_group("nccl") (FSDP with param offload:
  "cuda:nccl,cpu:gloo"), device cuda:LOCAL_RANK; AcceleratorState turns MULTI_GPU into FSDP with the plugin read
  from FSDP_* (utils/dataclasses.py FullyShardedDataParallelPlugin), or DEEPSPEED (DeepSpeed's comm init).
  Without CUDA, Accelerator() is DistributedType.NO (no process group: each rank would train alone); the ranks
  therefore pass cpu=True, which is MULTI_CPU on gloo with torchrun's RANK / WORLD_SIZE. accelerate turns FSDP on
  only in the accelerator-device branch, so MULTI_CPU's prepare wraps DDP: on the CPU an FSDP rank sets the state's
  distributed_type FSDP and the plugin from the environment itself (_fsdp_on_cpu); everything after that is
  accelerate's own code.
- accelerator.prepare(model, optimizer): FSDP2: _prepare_fsdp2 -> fsdp2_prepare_model (utils/fsdp_utils.py:
  fully_shard on each decoder layer class of TRANSFORMER_BASED_WRAP, on the untied input embeddings, on the tail
  [final norm, lm_head] or [embeddings, lm_head] when tied with reshard_after_forward False, then the root;
  non-float frozen Params4bit ignored; MixedPrecisionPolicy() and no fp32 upcast with mixed_precision 'no'), then
  the optimizer's parameters switched to the sharded ones (fsdp2_switch_optimizer_parameters); DDP:
  DistributedDataParallel(model, device_ids=[local rank] on CUDA) with its defaults, no autocast with
  mixed_precision 'no'; DeepSpeed: deepspeed.initialize with the plugin's config (train_micro_batch_size_per_gpu
  set by the rank, as accelerate's error message asks when no dataloader is prepared; with offload_optimizer the
  torch optimizer becomes DeepSpeed's CPU Adam, map_pytorch_optim_to_deepspeed).
The rank trace (memplan.trace.distributed._fully_shard) runs the same fsdp2_prepare_model with the same plugin,
so trace and profile shard the same units: rank 0's per-phase bytes on gloo equal `memplan trace --gpus N`'s
(tests/test_profile_multi.py). DeepSpeed cannot run on the CPU here (its engine needs an accelerator): zero1/2/3
are refused with --device cpu and run on CUDA (scripts/gpu_validate.sh). FSDP1 is not profiled (the FSDP2 path is
what fsdp_version 2 and the trace run).

Failures are results. A rank that runs out of memory or raises writes its own record and exits non-zero;
torchrun's agent then stops the other ranks (they would wait in a collective for ever): SIGTERM, which each rank
records as "interrupted" keeping what it measured, then SIGKILL 30 s later. Interrupting the launcher (Ctrl-C in
the grid) SIGTERMs accelerate launch, whose agent passes it on the same way. A rank killed before it could write is
rebuilt from the per-phase lines it printed as it went (all ranks print on accelerate launch's stdout, each line
naming its rank). The profile's status is the cause's: an OOM, else a rank killed from outside (status "killed";
its peers then fail in their collectives), else an error, else "interrupted", with the rank named in `oom` /
`error`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

GRACE_S = 15.0  # after this launcher is interrupted: how long the ranks get to record what they measured
AGENT_GRACE_S = 30.0  # torchrun's agent: SIGTERM to the ranks, SIGKILL 30 s later (elastic PContext.close)
RANK_EVENT = "rank_phase"  # the per-phase line a worker prints (the launcher's copy of what a rank measured)


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
    """Run one multi-GPU configuration: `accelerate launch` of N ranks, merged into one profile (written to
    job["output"])."""
    from memplan.profile.runner import _now, _sigterm, emit, recipe_dtype, _train_spec
    from memplan.profile.schema import SCHEMA, write_json_atomic

    signal.signal(signal.SIGTERM, _sigterm)
    train = _train_spec(job["train"])
    n, device = train.gpus, job["device"]
    run = dict(job["run"])
    run["parallel"] = {"gpus": n, "strategy": train.strategy, "backend": backend(device),
                       "launcher": "accelerate launch (torch.distributed.run: one process per rank, env://)",
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
        results, interrupted = _run_ranks(job, train, device, weights_dir, workdir, run)
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


def launch_files(job: dict, train, device: str, weights_dir: str | None, workdir: Path) -> tuple[list[str], dict]:
    """Write the ranks' job file and accelerate's config file; the command that launches them and the config."""
    from memplan.profile.accelerate_config import accelerate_config, decoder_layer_class, launch_argv, write_config

    layer_cls = None
    if train.strategy.startswith("fsdp"):
        try:
            layer_cls = decoder_layer_class(job["model"]["hf_config"], job.get("trust_remote_code", False))
        except Exception:  # noqa: BLE001 - accelerate then wraps the model's _no_split_modules itself
            layer_cls = None
    cfg = accelerate_config(train, device, layer_cls)
    run = dict(job["run"])
    if weights_dir:
        run["weights_dir"] = weights_dir  # the checkpoint the launcher wrote (or the user's --weights)
    rank_job = {**job, "run": run, "output": None, "compare": False, "parent_pid": None,
                "launcher_pid": os.getpid(),
                "dist": {"world_size": train.gpus, "backend": backend(device), "output_dir": str(workdir)}}
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(rank_job))
    config_path = write_config(workdir / "accelerate_config.yaml", cfg)
    return launch_argv(config_path, job_path), cfg


def _run_ranks(job: dict, train, device: str, weights_dir: str | None, workdir: Path,
               run: dict) -> tuple[dict, bool]:
    """`accelerate launch` the N ranks, read what they print, stop them when this process is interrupted:
    ({rank: what it measured}, whether this process was interrupted)."""
    from memplan.profile.accelerate_config import shown
    from memplan.profile.runner import emit

    n = train.gpus
    argv, cfg = launch_files(job, train, device, weights_dir, workdir)
    import accelerate

    run["launch"] = {"command": shown(argv), "config": cfg, "accelerate": accelerate.__version__}
    if train.strategy.startswith("zero"):
        import importlib.metadata

        run["launch"]["deepspeed"] = importlib.metadata.version("deepspeed")
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if job.get("threads"):
        env["OMP_NUM_THREADS"] = str(job["threads"])  # accelerate passes it on (num_cpu_threads_per_process)
    streams = {rank: {"phases": {}, "tail": []} for rank in range(n)}
    out = {"tail": [], "pids": {}}
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1,
                                start_new_session=True, preexec_fn=_die_with_parent)
    except KeyboardInterrupt:
        return {}, True
    reader = threading.Thread(target=_read, args=(proc, n, streams, out, emit), daemon=True)
    reader.start()
    interrupted = False
    try:
        proc.wait()
    except KeyboardInterrupt:  # torchrun's agent forwards the SIGTERM: each rank records what it measured
        interrupted = True
        stop([proc], GRACE_S + AGENT_GRACE_S)
    finally:
        reader.join(timeout=10)
    root = root_cause(out["tail"])
    # a rank without a record: killed from outside if torchrun's agent names it as the first failure (or names
    # none and nothing stopped the run), else stopped by the agent after that failure (SIGKILL after its grace)
    results = {rank: _rank_record(rank, workdir / f"rank{rank}.json", streams[rank], proc.returncode,
                                  stopped=interrupted or (root is not None and root[0] != rank),
                                  launcher_tail=out["tail"], exitcode=root[1] if root and root[0] == rank else None)
               for rank in range(n)
               if (workdir / f"rank{rank}.json").is_file() or streams[rank]["phases"] or rank in out["pids"]}
    if not results and proc.returncode not in (0, None) and not interrupted:
        raise RuntimeError(f"accelerate launch exited with status {proc.returncode} before any rank ran: "
                           + " | ".join(out["tail"][-8:]))
    return results, interrupted


def root_cause(lines: list[str]) -> tuple[int, str] | None:
    """The rank and exit code torchrun's agent reports as the "Root Cause (first observed failure)" when a rank
    fails (torch.distributed.elastic.multiprocessing.errors ChildFailedError.format_msg), None without one."""
    try:
        at = max(i for i, line in enumerate(lines) if "Root Cause (first observed failure)" in line)
    except ValueError:
        return None
    rank = code = None
    for line in lines[at + 1:at + 8]:
        key, _, value = line.strip().partition(":")
        if key.strip() == "rank" and rank is None:
            with contextlib.suppress(ValueError, IndexError):
                rank = int(value.split()[0])
        elif key.strip() == "exitcode" and code is None:
            code = value.split("(")[0].strip()
    return (rank, code) if rank is not None else None


def _die_with_parent() -> None:
    """accelerate launch (and with it torchrun's agent, which stops the ranks) dies with this launcher."""
    from memplan.profile.child import die_with_parent

    die_with_parent()


def _read(proc, n: int, streams: dict, out: dict, emit) -> None:
    """accelerate launch's output, every rank's lines in one stream: rank 0's progress goes on to the grid; every
    rank's per-phase records are kept; the pids of the ranks, once all have started, go out as one "ranks"
    event (tools that watch the ranks: the tests kill one)."""
    for line in proc.stdout:
        at = line.find("@memplan {")  # another process's unfinished line (a progress bar, a warning) may lead it
        if at >= 0:
            try:
                ev = json.loads(line[at + len("@memplan "):])
            except json.JSONDecodeError:
                continue
            rank = ev.pop("rank", 0)
            event = ev.get("event")
            if event == RANK_EVENT and rank in streams:
                streams[rank]["phases"][ev["phase"]] = ev["record"]
            elif event == "rank_started":
                out["pids"][rank] = ev["pid"]
                if len(out["pids"]) == n:
                    emit("ranks", pids=[out["pids"][r] for r in range(n)])
            elif rank == 0 and event in ("phase", "step", "status"):
                emit(ev.pop("event"), **ev)
        else:
            out["tail"] = (out["tail"] + [line.rstrip("\n")[-400:]])[-60:]


def stop(procs: list, grace_s: float = GRACE_S) -> None:
    """SIGTERM every running process, SIGKILL those still running after grace_s (with their process group: the
    ranks of an accelerate launch); wait for all."""
    for p in procs:
        if p.poll() is None:
            _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, OSError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            _signal(p, signal.SIGKILL)
            p.wait()


def _signal(proc, sig) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        proc.send_signal(sig)


def _rank_record(rank: int, out: Path, stream: dict, returncode, stopped: bool = False,
                 launcher_tail: list | None = None, exitcode: str | None = None) -> dict:
    """What one rank measured: its own profile document if it wrote one, else what its per-phase lines said
    (status "interrupted" if this launcher was stopped, else "killed": a rank that died without writing its
    record, which every other end writes, is a root cause; torchrun's agent then stops its peers)."""
    from memplan.profile.schema import read_json_validated

    data = read_json_validated(out, lambda d: None if isinstance(d, dict) and "measurements" in d else "no "
                               "measurements") if out.is_file() else None
    if data is not None:
        meas = data["measurements"]
        return {"rank": rank, "status": data["status"], "phases": meas.get("phases") or {},
                "peak": meas.get("peak"), "oom": data.get("oom"), "error": data.get("error"),
                "measurements": meas, "returncode": returncode}
    phases = stream["phases"]
    tail = " | ".join(line.strip() for line in (launcher_tail if launcher_tail is not None
                                                else stream.get("tail", []))[-8:])
    why = f"torchrun's agent: first failure, exit code {exitcode}" if exitcode is not None else \
        f"accelerate launch exited with status {returncode}"
    return {"rank": rank, "status": "interrupted" if stopped else "killed", "phases": phases, "peak": None,
            "oom": None, "error": {"type": "RankKilled", "message": f"rank {rank} ended without writing its record "
                                   f"({why}); last output: " + tail},
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
