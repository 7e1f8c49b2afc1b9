"""One profile run, inside the child process: load the model as users do, apply the recipe, run N real training
steps, measure every phase, write the profile (atomically) whatever happens.

Phases: load (from_pretrained + recipe + optimizer construction), forward, backward, optimizer (the first step;
the optimizer creates its states here) and steady (every step after the first, forward to optimizer, as one
phase). An out-of-memory error is a result (status "oom", with the phase and the bytes asked for); Ctrl-C or
SIGTERM ends the run as "interrupted" keeping what was measured; any other exception is "error".
A rank of a multi-GPU run (job["dist"], started by memplan.profile.multi) runs the same steps on its own device,
with memplan.profile.rank.Rank's hooks: the process group, the wrapping after the recipe, the step.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import traceback
from datetime import datetime, timezone

from memplan.profile.measure import (NVML, PhaseClock, Sampler, is_oom, max_rss_bytes, parse_oom_bytes,
                                     rss_bytes)
from memplan.profile.schema import SCHEMA, write_json_atomic

STEADY = "steady"


_EMIT_RANK: dict = {}  # a rank of a multi-GPU run: every line names it (the ranks share accelerate launch's stdout)


def set_emit_rank(rank: int) -> None:
    _EMIT_RANK["rank"] = rank


def emit(event: str, **fields) -> None:
    """A progress line for the parent process (it reads lines starting with '@memplan '). One write of the whole
    line: the ranks of a multi-GPU run share one pipe, and print() writes the text and its newline separately."""
    sys.stdout.write("@memplan " + json.dumps({"event": event, **fields, **_EMIT_RANK}) + "\n")
    sys.stdout.flush()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _train_spec(d: dict):
    from memplan.spec import TrainSpec

    d = dict(d)
    if isinstance(d.get("lora_targets"), list):
        d["lora_targets"] = tuple(d["lora_targets"])
    d["modules_to_save"] = tuple(d.get("modules_to_save") or ())
    return TrainSpec(**d)


def _model_spec(job: dict):
    from memplan.architectures import from_hf_config

    m = job["model"]
    return from_hf_config(dict(m["hf_config"]), m["name"], m.get("source") or m["name"])


_STOPPED = []  # set once SIGTERM / SIGINT arrived: a failure after it is part of being stopped


def _sigterm(signum, frame):
    _STOPPED.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


# ------------------------------------------------------------------------------------------------- the run

class _Meter:
    """Phase boundaries: closes the previous phase's figures, opens the next."""

    def __init__(self, device: str, phases: dict, tracker=None, sampler=None, nvml_baseline: int = 0,
                 report: bool = False):
        self.device = device
        self.report = report  # a rank of a multi-GPU run: print each phase's figures for the launcher
        self.phases = phases
        self.tracker = tracker
        self.sampler = sampler
        self.nvml_baseline = nvml_baseline
        self.clock = PhaseClock()
        self.current = None

    def enter(self, phase: str | None) -> None:
        if phase == self.current:
            return
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        previous = self.current
        self.clock.enter(phase)
        self.current = phase
        if previous is not None:
            self._close(previous)
        if phase is None:
            return
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        if self.tracker is not None:
            self.tracker.phase = phase
        if self.sampler is not None:
            self.sampler.set_phase(phase)
        emit("phase", phase=phase)

    def _close(self, phase: str) -> None:
        rec = self.phases.setdefault(phase, {})
        rec["seconds"] = round(self.clock.seconds.get(phase, 0.0), 6)
        if self.device == "cuda":
            import torch

            rec["allocated_peak_bytes"] = max(rec.get("allocated_peak_bytes") or 0, torch.cuda.max_memory_allocated())
            rec["reserved_peak_bytes"] = max(rec.get("reserved_peak_bytes") or 0, torch.cuda.max_memory_reserved())
            rec["allocated_end_bytes"] = torch.cuda.memory_allocated()
            rec["reserved_end_bytes"] = torch.cuda.memory_reserved()
            if self.sampler is not None:
                self.sampler.sample()
                used = self.sampler.peaks.get(phase)
                if used is not None:
                    rec["nvml_used_peak_bytes"] = used
                    rec["nvml_process_peak_bytes"] = used - self.nvml_baseline
        else:
            if self.tracker is not None:
                rec["tracker_peak_bytes"] = self.tracker.phase_peaks.get(phase, self.tracker.current)
                rec["tracker_end_bytes"] = self.tracker.current
            if self.sampler is not None:
                self.sampler.sample()
                if phase in self.sampler.peaks:
                    rec["rss_peak_bytes"] = self.sampler.peaks[phase]
        if self.report:  # the launcher keeps these if the rank is killed before it writes its record
            from memplan.profile.multi import RANK_EVENT

            emit(RANK_EVENT, phase=phase, record=rec)


def run_job(job: dict) -> dict:
    """Run one configuration; returns the profile (also written to job["output"] unless it is None)."""
    from memplan.profile.env import environment

    signal.signal(signal.SIGTERM, _sigterm)
    device = job["device"]
    created = job.get("created") or _now()
    run = dict(job["run"])
    profile = {
        "schema": SCHEMA, "key": job["key"], "created": created, "status": "error",
        "model": {"name": job["model"]["name"], "source": job["model"].get("source"),
                  "hf_config": job["model"]["hf_config"]},
        "train": job["train"], "run": run,
        "measurements": {"phases": {}}, "oom": None, "error": None, "comparison": {}, "environment": {},
    }
    meas = profile["measurements"]
    state = {}
    try:
        _measure(job, profile, meas, state)
        profile["status"] = "ok"
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the profile's writing
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        profile["status"] = "interrupted"
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, never raised past the profile
        oom = _oom_record(e, state)
        if oom is None and _STOPPED and job.get("dist"):
            # a rank stopped by its launcher while it waited in a collective: the peers that left make the
            # collective fail before the signal's KeyboardInterrupt is seen
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            profile["status"] = "interrupted"
            meas["stop_note"] = f"stopped; the collective then failed: {e.__class__.__name__}: {e}"[:300]
        elif oom is not None:
            profile["status"] = "oom"
            profile["oom"] = oom
        else:
            profile["status"] = "error"
            profile["error"] = {"type": e.__class__.__name__, "message": str(e)[:2000],
                                "phase": state.get("phase"),
                                "traceback": traceback.format_exc()[-4000:]}
    finally:
        if job.get("dist"):  # a rank has measured: its launcher's stop request must not cut the record's writing
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        meter = state.get("meter")
        if meter is not None and meter.current is not None:
            try:
                meter.enter(None)
            except BaseException:  # noqa: BLE001 - a CUDA fault may make synchronize raise again
                pass
        for s in ("sampler",):
            if state.get(s) is not None:
                state[s].stop()
        if state.get("tracker") is not None:
            meas["tracker"] = {"peak_bytes": state["tracker"].peak, "peak_phase": state["tracker"].peak_phase,
                               "by_category_at_peak": state["tracker"].by_category()}
        meas["rss_max_bytes"] = max_rss_bytes()
        if state.get("snapshot"):
            try:  # torch.cuda.memory._dump_snapshot: a plain pickle memplan replay reads
                import torch

                torch.cuda.memory._dump_snapshot(state["snapshot"])
                torch.cuda.memory._record_memory_history(enabled=None)
                meas["snapshot"] = state["snapshot"]
            except Exception as e:  # noqa: BLE001 - a snapshot failing must not lose the measurement
                meas["snapshot_note"] = f"snapshot failed: {e.__class__.__name__}: {e}"[:300]
        _summarize(profile, state)
        if state.get("rank") is not None:
            state["rank"].close()
        try:  # after the measurement: torch's device query creates a CUDA context, which must not be counted
            profile["environment"] = environment(device)
        except Exception as e:  # noqa: BLE001 - after a CUDA fault the device may not answer
            profile["environment"] = {"note": f"environment query failed: {e.__class__.__name__}: {e}"[:300]}
    state.clear()
    gc.collect()
    if profile["status"] in ("ok", "oom") and job.get("compare", True):
        from memplan.profile.compare import attach

        attach(job, profile)
    profile["finished"] = _now()
    if job.get("output"):
        from memplan.profile.child import orphaned

        if orphaned(job):  # the grid is gone: a resumed grid runs this configuration itself; write nothing
            emit("orphaned", path=job["output"])
            return profile
        write_json_atomic(job["output"], profile)
        emit("written", path=job["output"], status=profile["status"])
    return profile


def _measure(job: dict, profile: dict, meas: dict, state: dict) -> None:
    import torch

    from memplan import recipe
    from memplan.profile.loading import check_weights_dir, load_direct, load_pretrained
    from memplan.profile.weights import write_random_checkpoint

    device, run = job["device"], profile["run"]
    if (job["model"]["hf_config"] or {}).get("auto_map") and not job.get("trust_remote_code"):
        # the parent refuses such configs (memplan.catalog.resolve_model); a job file is checked again here
        from memplan.errors import MemplanError

        raise MemplanError("the config asks for remote code (auto_map); not run without --trust-remote-code")
    train = _train_spec(job["train"])
    spec = _model_spec(job)
    steps = int(run.get("steps", 3))
    torch.manual_seed(int(run.get("seed", 0)))
    phases = meas["phases"]
    rank = None
    if job.get("dist"):  # one rank of a multi-GPU run (memplan.profile.multi)
        from memplan.profile.rank import Rank

        rank = state["rank"] = Rank(job, train)
    dev = rank.torch_device if rank is not None else device
    local = rank.local_rank if rank is not None else 0

    tracker = sampler = None
    nvml_baseline = 0
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device")
        try:  # NVML first: no CUDA call may come before the baseline reading
            nvml = NVML(uuid=_visible_uuid(local), index=_visible_index(local))
            state["nvml"] = nvml
            nvml_baseline = nvml.used()
        except Exception as e:  # noqa: BLE001 - NVML missing: allocator figures only
            nvml = None
            meas["nvml_note"] = f"NVML unavailable: {e.__class__.__name__}: {e}"
        torch.cuda.init()
        if rank is not None:
            torch.cuda.set_device(local)
        torch.zeros(1, device=dev)
        torch.cuda.synchronize()
        if nvml is not None:
            time.sleep(0.05)
            after = nvml.used()
            meas["nvml_baseline_used_bytes"] = nvml_baseline
            # the context (and the allocator's first 2 MiB segment, subtracted here)
            meas["cuda_context_bytes"] = after - nvml_baseline - torch.cuda.memory_reserved()
            meas["nvml_total_bytes"] = nvml.total()
            sampler = Sampler(nvml.used, interval=float(run.get("sample_interval_s") or 0.005))
        if run.get("memory_fraction"):
            torch.cuda.set_per_process_memory_fraction(float(run["memory_fraction"]))
        torch.cuda.reset_peak_memory_stats()
        if os.environ.get("MEMPLAN_SNAPSHOT"):  # the allocator's own trace, for `memplan replay` (no stacks)
            torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python",
                                                     max_entries=int(os.environ.get("MEMPLAN_SNAPSHOT_ENTRIES",
                                                                                    4_000_000)))
            state["snapshot"] = os.environ["MEMPLAN_SNAPSHOT"]
    else:
        from memplan.trace.tracker import LiveBytesTracker

        tracker = LiveBytesTracker(budget_bytes=run.get("cpu_budget_bytes"), keep_timeline=False)
        sampler = Sampler(rss_bytes, interval=float(run.get("sample_interval_s") or 0.01))
        state["tracker"] = tracker
    state["sampler"] = sampler
    if sampler is not None:
        sampler.start()
    if rank is not None:  # after the CUDA context is measured: NCCL's communicator buffers count in NVML's figure
        rank.init()
    meter = _Meter(device, phases, tracker=tracker, sampler=sampler, nvml_baseline=nvml_baseline,
                   report=rank is not None)
    state["meter"] = meter

    # ---- load: the base model as users load it, the recipe (k-bit prep, checkpointing, LoRA), the optimizer
    state["phase"] = "load"
    meter.enter("load")
    t0 = time.perf_counter()
    load_path = run.get("load_path", "pretrained")
    if load_path == "direct":
        model = load_direct(job["model"]["hf_config"], train, dev, job.get("trust_remote_code", False),
                            seed=int(run.get("seed", 0)))
    else:
        if run.get("weights_dir"):
            folder = check_weights_dir(run["weights_dir"])
        else:
            emit("status", text="writing random-weight checkpoint")
            folder = write_random_checkpoint(job["model"]["hf_config"], recipe_dtype(train),
                                             run.get("weights_cache"), trust_remote_code=job.get("trust_remote_code",
                                                                                                 False))
            meas["random_checkpoint_seconds"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
        emit("status", text="from_pretrained")
        model = load_pretrained(folder, train, dev, job.get("trust_remote_code", False))
    meas["load_seconds"] = round(time.perf_counter() - t0, 3)
    if train.liger:
        if device == "cuda":
            recipe.apply_liger(model, train)
        else:  # Triton kernels need CUDA: the CPU profile runs the trace's models of them
            from memplan.trace.liger import apply_liger_models

            apply_liger_models(model, spec.model_type)
    state["model"] = model = recipe.apply_recipe(model, spec, train)
    if rank is None:
        params = recipe.trainable_parameters(model)
        state["optimizer"] = optimizer = recipe.make_optimizer(params, train, paged=(device == "cuda"))
    else:  # the optimizer over the model, then accelerator.prepare(model, optimizer) (memplan.profile.multi)
        optimizer = recipe.make_optimizer(recipe.trainable_parameters(model), train, paged=(device == "cuda"))
        state["model"], state["optimizer"] = model, optimizer = rank.prepare(model, optimizer, tracker)
        params = recipe.trainable_parameters(model)
    meas["trainable_params"] = sum(p.numel() for p in params)
    meas["model_tensor_bytes"] = _tensor_bytes(model)
    # each rank its own micro-batch, as a DistributedSampler gives it (the bytes do not depend on the values)
    gen = torch.Generator(device="cpu").manual_seed(int(run.get("seed", 0)) + (rank.rank if rank else 0))
    input_ids = torch.randint(0, spec.vocab_size, (train.batch_size, train.seq_len), generator=gen).to(dev)
    if tracker is not None:
        from memplan.trace.attribution import register_model  # the trace's attribution, local shards included

        register_model(tracker, model)
        tracker.register(input_ids, "activations", "input_ids")
        budget = run.get("cpu_budget_bytes")
        if budget is not None and tracker.current > budget:
            from memplan.trace.tracker import TrackerOutOfMemory

            raise TrackerOutOfMemory(tracker.current, 0, "load", budget, "model")
        tracker.phase_peaks["load"] = tracker.current  # what is resident after loading (DDP's buckets included)
    meter.enter(None)

    # ---- the steps
    tokens = train.batch_size * train.seq_len
    meas["tokens_per_step"] = tokens
    times = meas.setdefault("step_times_s", [])
    losses = meas.setdefault("losses", [])
    ctx = tracker if tracker is not None else _Null()
    offload_ctx = recipe.activation_offload_context(model, train) if device == "cuda" else None
    fused_loss = None
    if train.loss != "standard" and device != "cuda":  # Liger / CCE run Triton kernels: CUDA only
        from memplan.trace.losses import make_cce, make_liger

        fused_loss = {"liger": make_liger, "cce": make_cce}[train.loss]()
    # the tracker outside, the kernel models inside (as the trace nests them): a dispatch mode pushed later sees
    # an op first, so the tracker counts what the gemm_4bit model allocates
    step_fn = recipe.train_step if rank is None else rank.train_step
    with ctx, _kernel_models(run, train, device), rank.step_context(tracker) if rank else _Null():
        for step in range(steps):
            state["step"] = step

            def on_phase(p, _first=(step == 0)):
                name = p if _first else f"{STEADY}_{p}"
                state["phase"] = name
                meter.enter(name)

            t = time.perf_counter()
            loss = step_fn(model, optimizer, input_ids, on_phase, offload_ctx, train, fused_loss)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(round(time.perf_counter() - t, 6))
            losses.append(float(loss))
            del loss
            if step == 0:
                meter.enter(None)  # close "optimizer" so steady starts clean
            emit("step", step=step + 1, steps=steps, seconds=times[-1])
        meter.enter(None)


def _steady_total(phases: dict) -> None:
    """phases["steady"]: the steps after the first as one phase (each figure the max of its sub-phases)."""
    subs = [v for k, v in phases.items() if k.startswith(STEADY + "_")]
    if not subs:
        return
    total = {"seconds": round(sum(v.get("seconds") or 0 for v in subs), 6)}
    for key in {k for v in subs for k in v if k.endswith("_peak_bytes")}:
        total[key] = max(v[key] for v in subs if v.get(key) is not None)
    for key in ("tracker_end_bytes", "allocated_end_bytes", "reserved_end_bytes"):
        last = [v[key] for v in subs if v.get(key) is not None]
        if last:
            total[key] = last[-1]
    phases[STEADY] = total


def recipe_dtype(train) -> str:
    from memplan.profile.loading import load_dtype

    return load_dtype(train)


def _kernel_models(run: dict, train, device: str):
    """--kernels gpu on the CPU: run the step with the trace's models of the CUDA kernels' memory (fused
    flash attention instead of the CPU math SDPA, the fused dropout's 1-byte mask, bitsandbytes' CUDA gemm_4bit
    path), computing real values, so the CPU tracker measures what the GPU kernels would allocate."""
    import contextlib

    if device != "cpu" or run.get("kernels", "native") != "gpu":
        return contextlib.nullcontext()
    from memplan.trace.kernels import gemm_4bit_cuda_semantics as _gemm_4bit_cuda_semantics, patched as _patched

    stack = contextlib.ExitStack()
    stack.enter_context(_patched(train))
    if train.bits == 4:
        stack.enter_context(_gemm_4bit_cuda_semantics())
    return stack


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _visible(i: int = 0) -> str:
    """Entry i of CUDA_VISIBLE_DEVICES (CUDA device i), or str(i) when it is unset."""
    entries = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return entries[i] if i < len(entries) else str(i)


def _visible_uuid(i: int = 0) -> str | None:
    """The NVML UUID of CUDA device i, from CUDA_VISIBLE_DEVICES, without touching CUDA."""
    entry = _visible(i)
    return entry if entry.startswith(("GPU-", "MIG-")) else None


def _visible_index(i: int = 0) -> int:
    entry = _visible(i)
    return int(entry) if entry.isdigit() else i


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        if s._cdata not in seen:
            seen.add(s._cdata)
            total += s.nbytes()
    return total


def _oom_record(e: BaseException, state: dict) -> dict | None:
    from_tracker = e.__class__.__name__ == "TrackerOutOfMemory"
    if not from_tracker and not is_oom(e):
        return None
    rec = {"phase": getattr(e, "phase", None) or state.get("phase"), "step": state.get("step"),
           "kind": "tracker-budget" if from_tracker else "cuda", "message": str(e).strip().splitlines()[0][:1000]}
    if from_tracker:
        rec.update(requested_bytes=e.requested_bytes, live_bytes=e.live_bytes, budget_bytes=e.budget_bytes,
                   module=getattr(e, "module", ""))
    else:
        rec["requested_bytes"] = parse_oom_bytes(str(e))
        try:
            import torch

            rec["allocated_bytes"] = torch.cuda.memory_allocated()
            rec["reserved_bytes"] = torch.cuda.memory_reserved()
            rec["allocated_peak_bytes"] = torch.cuda.max_memory_allocated()
        except Exception:  # noqa: BLE001
            pass
    return rec


def _summarize(profile: dict, state: dict) -> None:
    """measurements.peak: the phase with the highest tensor-byte peak and its figures; step time, tokens/s."""
    meas = profile["measurements"]
    phases = meas["phases"]
    _steady_total(phases)
    device = profile["run"]["device"]
    key = "allocated_peak_bytes" if device == "cuda" else "tracker_peak_bytes"
    best = None
    for name, rec in phases.items():
        if name.startswith(STEADY + "_"):
            continue
        if rec.get(key) is not None and (best is None or rec[key] > phases[best][key]):
            best = name
    if best is not None:
        rec = phases[best]
        peak = {"phase": best, "bytes": rec[key], "measure": key}
        if device == "cuda":
            peak["allocated_bytes"] = rec.get("allocated_peak_bytes")
            peak["reserved_bytes"] = max((r.get("reserved_peak_bytes") or 0) for r in phases.values())
            nv = [r["nvml_used_peak_bytes"] for r in phases.values() if r.get("nvml_used_peak_bytes") is not None]
            if nv:
                peak["nvml_used_bytes"] = max(nv)
                peak["nvml_process_bytes"] = max(r["nvml_process_peak_bytes"] for r in phases.values()
                                                 if r.get("nvml_process_peak_bytes") is not None)
        else:
            peak["tracker_bytes"] = rec.get("tracker_peak_bytes")
            rss = [r["rss_peak_bytes"] for r in phases.values() if r.get("rss_peak_bytes") is not None]
            peak["rss_bytes"] = max(rss) if rss else None
        meas["peak"] = peak
    times = meas.get("step_times_s") or []
    if times:
        steady = times[1:] or times
        meas["steady_step_time_s"] = round(sum(steady) / len(steady), 6)
        meas["tokens_per_s"] = round(meas.get("tokens_per_step", 0) / meas["steady_step_time_s"], 3) \
            if meas["steady_step_time_s"] > 0 else None
