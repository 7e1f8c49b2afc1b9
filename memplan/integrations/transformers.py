"""MemplanCallback: a transformers TrainerCallback that checks a live run against memplan (TRL's SFTTrainer takes it
unchanged: `SFTTrainer(..., callbacks=[MemplanCallback()])`).

- on_train_begin: the run's TrainSpec read from the live model and arguments (bitsandbytes quantization config,
  PEFT's LoraConfig and adapter dtype, whether non-quantized weights were upcast to fp32, args.optim, batch size,
  gradient checkpointing, attention implementation), the model's architecture from its config, and the estimate
  at the longest batch the training set holds (its `input_ids` lengths, capped at max_length).
- every step: per phase (forward = the model's forward, backward = up to the optimizer step, optimizer = the step)
  torch.cuda.max_memory_allocated / max_memory_reserved on CUDA (reset at each phase boundary), or, on the CPU,
  the live tensor bytes of memplan's LiveBytesTracker (the trace's counter), entered at train begin.
- after `compare_steps` steps: measured vs the estimate at the shapes measured, per phase, logged; and, when the
  longest batch of the training set is longer than any measured, its peak projected (the estimate at that shape
  times the measured / estimated ratio) and a warning when it exceeds the device (or the tracker's budget).
- a memplan profile JSON (memplan.profile/1, memplan/profile/schema.py) written atomically to `output_dir`
  after the compared steps and again at train end, so real runs feed `memplan calibrate` and `memplan validate`.

Heavy imports (torch, transformers) happen when the callback is built: importing memplan stays torch-free.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from transformers import TrainerCallback

from memplan.errors import MemplanError

log = logging.getLogger("memplan")
GIB = 2**30
SOURCE = "memplan.integrations.transformers.MemplanCallback"


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 4 else f"{n / 2**20:.1f} MiB"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000")


def _dtype(t) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(t, str(t))


def spec_from_live(model, args, seq_len: int):
    """The TrainSpec of a live (PEFT) model and its TrainingArguments."""
    import torch

    from memplan.integrations.config import HF_OPTIMIZERS
    from memplan.spec import TrainSpec

    cfg = getattr(model, "config", None)
    q = getattr(cfg, "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else (q or {})
    params = list(model.named_parameters())
    base = next((p for n, p in params if "lora_" not in n and p.is_floating_point() and p.ndim == 2), None)
    s = {}
    if q.get("load_in_4bit"):
        s.update(bits=4, quant_type=q.get("bnb_4bit_quant_type", "nf4"),
                 double_quant=bool(q.get("bnb_4bit_use_double_quant")),
                 compute_dtype=_dtype(_torch_dtype(q.get("bnb_4bit_compute_dtype"))) or "fp32")
    elif q.get("load_in_8bit"):
        s.update(bits=8)
    else:
        s.update(bits=32 if base is not None and base.dtype == torch.float32 else 16)
    if s["bits"] != 4:
        s["compute_dtype"] = "bf16" if args.bf16 else "fp16" if args.fp16 else (
            _dtype(base.dtype) if base is not None else "fp32")
    peft = getattr(model, "peft_config", None)
    if peft:
        lc = peft.get("default") or next(iter(peft.values()))
        targets = lc.target_modules
        targets = "all-linear" if targets == "all-linear" else tuple(sorted(targets))
        lora = next((p for n, p in params if "lora_A" in n), None)
        s.update(method="lora", lora_r=int(lc.r), lora_alpha=int(lc.lora_alpha), lora_dropout=float(lc.lora_dropout),
                 lora_targets=targets, dora=bool(getattr(lc, "use_dora", False)),
                 modules_to_save=tuple(lc.modules_to_save or ()),
                 lora_dtype=_dtype(lora.dtype) if lora is not None else "fp32")
    else:
        s["method"] = "full"
    # prepare_model_for_kbit_training leaves every non-quantized weight in fp32
    embed = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    s["upcast"] = bool(s["bits"] in (4, 8) and embed is not None and embed.dtype == torch.float32)
    optim = getattr(args.optim, "value", args.optim)
    if optim not in HF_OPTIMIZERS:
        raise MemplanError(f"optim {optim!r} is not modelled by memplan")
    s["optimizer"] = HF_OPTIMIZERS[optim]
    s["batch_size"] = int(args.per_device_train_batch_size)
    s["seq_len"] = int(seq_len)
    on = getattr(model, "is_activation_checkpointing", None)  # transformers 5's name; is_gradient_checkpointing before
    if on is None:
        on = getattr(model, "is_gradient_checkpointing", False)
    s["gradient_checkpointing"] = bool(getattr(args, "gradient_checkpointing", False) or on)
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    from memplan.spec import ATTENTIONS

    s["attention"] = impl if impl in ATTENTIONS else "sdpa"
    if getattr(args, "use_liger_kernel", False):  # Trainer: apply_liger_kernel(model, args.liger_kernel_config)
        kernels = getattr(args, "liger_kernel_config", None) or {}
        s["liger"] = any(kernels.get(k, True) is not False for k in ("rope", "swiglu", "rms_norm"))
        if kernels.get("fused_linear_cross_entropy", True) is not False:  # SFTTrainer sets it False (its LM head)
            s["loss"] = "liger"
    if getattr(args, "activation_offloading", False):  # TRL SFTConfig: OffloadActivations around each step
        s["activation_offload"] = "all"
    return TrainSpec(**s)


def _torch_dtype(value):
    import torch

    if isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value).replace("torch.", ""), None) if value else None


def _fused_lm_head(module) -> bool:
    """TRL's add_fused_lm_head replaces the instance's forward with a functools.wraps'd `_fused_forward`."""
    fwd = module.__dict__.get("forward")
    code = getattr(getattr(fwd, "__func__", fwd), "__code__", None)
    return code is not None and code.co_name == "_fused_forward"


def dataset_lengths(dataloader, cap: int | None, limit: int = 2_000_000) -> list[int] | None:
    """input_ids lengths of the training set (capped at `cap`), read without iterating the dataloader (which
    would draw from torch's generator and change the training order). None when the set does not say."""
    ds = getattr(dataloader, "dataset", None)
    if ds is None:
        return None
    try:
        if hasattr(ds, "column_names") and "input_ids" in (ds.column_names or []):
            if len(ds) > limit:
                return None
            lengths = [len(x) for x in ds["input_ids"]]
        elif hasattr(ds, "__len__") and hasattr(ds, "__getitem__") and len(ds) <= 100_000:
            lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
        else:
            return None
    except (KeyError, TypeError, IndexError):
        return None
    return [min(n, cap) for n in lengths] if cap else lengths


def _guarded(event):
    """A callback event that never stops the training run: an error of memplan's own (an optimizer it has no
    formula for, an architecture it does not know) is logged once and turns the callback off. The tracker's
    simulated out-of-memory (cpu_budget_bytes) is the one exception that propagates, as CUDA's would."""
    import functools

    @functools.wraps(event)
    def run(self, *args, **kwargs):
        if self.disabled:
            return None
        try:
            return event(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - see the docstring
            from memplan.trace.tracker import TrackerOutOfMemory

            if isinstance(e, TrackerOutOfMemory):
                raise
            self.disabled = f"{e.__class__.__name__}: {e}"
            log.warning("memplan: MemplanCallback is off for this run (%s)", self.disabled)
            self._detach()
            return None

    return run


def _device_kind(param) -> str:
    """"cuda" when the model's parameters are on a CUDA device (measured by torch.cuda's counters), else "cpu" (the
    live-bytes tracker). tests/test_integrations_callback.py runs the CUDA branch on the CPU through this."""
    return "cuda" if param.device.type == "cuda" else "cpu"


class MemplanCallback(TrainerCallback):
    """Estimate, measure and compare a live run; warn before the longest batch; write a memplan profile.

    output_dir: where the profile JSON goes (default: args.output_dir/memplan); None-like "" to not write.
    compare_steps: steps measured before the comparison (the first step creates the optimizer states).
    device_bytes: the memory to warn against (default: the CUDA device's total; on the CPU, cpu_budget_bytes).
    cpu_budget_bytes: on the CPU, simulate a device of this size in the tracker (an allocation past it raises
    TrackerOutOfMemory, as CUDA raises OutOfMemoryError).
    """

    def __init__(self, output_dir: str | None = None, compare_steps: int = 2, device_bytes: int | None = None,
                 cpu_budget_bytes: int | None = None, max_length: int | None = None, model_name: str | None = None):
        self.output_dir = output_dir
        self.compare_steps = max(1, int(compare_steps))
        self.device_bytes = device_bytes
        self.cpu_budget_bytes = cpu_budget_bytes
        self.max_length = max_length
        self.model_name = model_name
        self.profile: dict | None = None
        self.path: Path | None = None
        self.comparison: dict | None = None
        self.warnings: list[str] = []
        self.disabled: str | bool = False
        self._reset()

    def _reset(self):
        self.device = "cpu"
        self.tracker = None
        self.phases: dict[str, dict] = {}
        self.phase: str | None = None
        self.steps = 0
        self.shapes: list[tuple[int, int]] = []
        self.step_times: list[float] = []
        self.in_step = False
        self.hooks = []
        self.model_spec = self.spec = None
        self.notes: list[str] = []
        self.longest: tuple[int, int] | None = None

    # ------------------------------------------------------------------------------------------- events
    @_guarded
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        import torch

        from memplan.architectures import from_hf_config

        self._reset()
        self.disabled = False
        self._key = None
        self.warnings = []
        self.args = args
        p = next(model.parameters())
        self.device = _device_kind(p)
        cfg = model.config.to_dict()
        name = self.model_name or getattr(model.config, "name_or_path", None) or cfg.get("model_type", "model")
        self.model_spec = from_hf_config({k: v for k, v in cfg.items() if k != "quantization_config"},
                                         str(name), SOURCE)
        cap = self.max_length or getattr(args, "max_length", None) or getattr(args, "max_seq_length", None)
        lengths = dataset_lengths(train_dataloader, cap)
        bs = int(args.per_device_train_batch_size)
        longest = max(lengths) if lengths else (cap or 2048)
        self.longest = (bs, int(longest))
        self.spec = spec_from_live(model, args, longest)
        from memplan.estimate import estimate

        self.estimate_longest = estimate(self.model_spec, self.spec)
        log.info("memplan: %s · estimate at the longest batch (%d × %d): tensor peak %s (%s), device total %s",
                 name, bs, longest, _size(self.estimate_longest.peak_bytes), self.estimate_longest.peak_phase,
                 _size(self.estimate_longest.device_total_bytes))
        if self.device == "cuda":
            self.device_bytes = self.device_bytes or torch.cuda.get_device_properties(p.device).total_memory
            torch.cuda.synchronize()
            self.phases["load"] = {"allocated_peak_bytes": torch.cuda.max_memory_allocated(),
                                   "reserved_peak_bytes": torch.cuda.max_memory_reserved(),
                                   "allocated_end_bytes": torch.cuda.memory_allocated()}
            torch.cuda.reset_peak_memory_stats()
        else:
            from memplan.trace.attribution import register_model
            from memplan.trace.tracker import LiveBytesTracker

            self.device_bytes = self.device_bytes or self.cpu_budget_bytes
            self.tracker = LiveBytesTracker(self.cpu_budget_bytes, keep_timeline=False)
            register_model(self.tracker, model)
            self.phases["load"] = {"tracker_peak_bytes": self.tracker.current, "tracker_end_bytes": self.tracker.current}
            self.tracker.phase = "idle"
            self.tracker.__enter__()
            self._entered = True
        self.notes = []
        if any(_fused_lm_head(m) for m in model.modules()):
            self.notes.append("TRL's fused LM head computes the loss (trl/trainer/utils.py add_fused_lm_head: log-probs "
                              "in tiles of 32768 vocabulary columns, no b·s·V logits); memplan models the standard "
                              "loss, so forward/backward differ by the loss term (lower for a large vocabulary, "
                              "higher for one under 32768 columns)")
            log.warning("memplan: note: %s", self.notes[-1])
        total = self.estimate_longest.device_total_bytes if self.device == "cuda" else self.estimate_longest.peak_bytes
        if self.device_bytes and total > self.device_bytes:
            self._warn(f"memplan: the longest batch of the training set ({bs} × {longest} tokens) is estimated to "
                       f"need {_size(total)}, over the device's {_size(self.device_bytes)} (measured figures follow "
                       f"after {self.compare_steps} steps)")
        self.hooks = [model.register_forward_pre_hook(self._forward_begin, with_kwargs=True),
                      model.register_forward_hook(self._forward_end)]

    def _forward_begin(self, module, args, kwargs):
        if not self.in_step or self.disabled:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and getattr(ids, "ndim", 0) == 2:
            self.shapes[-1] = max(self.shapes[-1], (int(ids.shape[0]), int(ids.shape[1])), key=lambda x: x[0] * x[1])
        self._enter("forward")

    def _forward_end(self, module, args, output):
        if self.in_step and not self.disabled:
            self._enter("backward")

    @_guarded
    def on_step_begin(self, args, state, control, **kwargs):
        self.in_step = True
        self.shapes.append((0, 0))
        self._t = time.perf_counter()

    @_guarded
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._enter("optimizer")

    @_guarded
    def on_optimizer_step(self, args, state, control, **kwargs):
        self._enter(None)

    @_guarded
    def on_step_end(self, args, state, control, **kwargs):
        self._enter(None)
        self.in_step = False
        self.steps += 1
        self.step_times.append(round(time.perf_counter() - self._t, 6))
        if self.steps == self.compare_steps:
            self._compare()
            self._write("ok")

    @_guarded
    def on_train_end(self, args, state, control, **kwargs):
        self._enter(None)
        self._detach()
        if self.steps and self.steps != self.compare_steps:
            self._compare()
        if self.steps:
            self._write("ok")

    def close(self) -> None:
        """Detach the hooks and leave the CPU tracker. on_train_end does it; call it yourself after a run that
        stopped with an exception (a simulated out-of-memory), before running more torch code in the process."""
        self._detach()

    def _detach(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.tracker is not None and getattr(self, "_entered", False):
            self._entered = False
            self.tracker.__exit__(None, None, None)
            self.tracker.stop()

    # ------------------------------------------------------------------------------------------ phases
    def _name(self, phase: str) -> str:
        return phase if self.steps == 0 else f"steady_{phase}"

    def _enter(self, phase: str | None) -> None:
        name = self._name(phase) if phase else None
        if name == self.phase:
            return
        if self.phase is not None:
            self._close(self.phase)
        self.phase = name
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.tracker is not None:
            self.tracker.phase = name or "idle"
            if name:  # the tracker updates a phase's peak on changes: the level at entry counts too
                self.tracker.phase_peaks[name] = max(self.tracker.phase_peaks.get(name, 0), self.tracker.current)

    def _close(self, name: str) -> None:
        rec = self.phases.setdefault(name, {})
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            rec["allocated_peak_bytes"] = max(rec.get("allocated_peak_bytes", 0), torch.cuda.max_memory_allocated())
            rec["reserved_peak_bytes"] = max(rec.get("reserved_peak_bytes", 0), torch.cuda.max_memory_reserved())
            rec["allocated_end_bytes"] = torch.cuda.memory_allocated()
        else:
            rec["tracker_peak_bytes"] = max(rec.get("tracker_peak_bytes", 0), self.tracker.phase_peaks.get(name, 0))
            rec["tracker_end_bytes"] = self.tracker.current

    # --------------------------------------------------------------------------------------- comparison
    def _compare(self) -> None:
        from memplan.estimate import estimate
        from memplan.profile.compare import pct

        key = "allocated_peak_bytes" if self.device == "cuda" else "tracker_peak_bytes"
        shape = max(self.shapes, key=lambda x: x[0] * x[1]) if self.shapes else self.longest
        est = estimate(self.model_spec, self.spec.with_(batch_size=max(1, shape[0]), seq_len=max(1, shape[1])))
        measured = {}
        for ph in ("load", "forward", "backward", "optimizer"):
            vals = [self.phases[n][key] for n in (ph, f"steady_{ph}") if key in self.phases.get(n, {})]
            if vals:
                measured[ph] = max(vals)
        peak = max(measured.values()) if measured else None
        errors = {ph: pct(est.phases.get(ph), v) for ph, v in measured.items()}
        self.comparison = {"notes": list(self.notes),
                           "measured": {"peak_bytes": peak, "phases": measured, "shape": list(shape)},
                           "estimate": {"peak_bytes": est.peak_bytes, "device_total_bytes": est.device_total_bytes,
                                        "phases": dict(est.phases), "error_pct": pct(est.peak_bytes, peak),
                                        "phase_error_pct": errors}}
        what = "max_memory_allocated" if self.device == "cuda" else "live tensor bytes (CPU tracker)"
        lines = [f"memplan: measured ({what}) vs estimate at {shape[0]} × {shape[1]} tokens, after {self.steps} steps:"]
        for ph, v in measured.items():
            e = est.phases.get(ph)
            err = errors[ph]
            lines.append(f"  {ph:<9} measured {_size(v):>11}   estimate {_size(e) if e else '-':>11}   "
                         f"error {f'{err:+.1f}%' if err is not None else '-'}")
        if self.device == "cuda":
            reserved = max(r.get("reserved_peak_bytes", 0) for r in self.phases.values())
            self.comparison["measured"]["reserved_peak_bytes"] = reserved
            lines.append(f"  reserved peak {_size(reserved)} (max_memory_reserved); estimated device total "
                         f"{_size(est.device_total_bytes)}")
        log.warning("\n".join(lines))
        self._project(est, peak)

    def _project(self, est, peak) -> None:
        """Warn when the longest batch of the training set, longer than any measured, is projected past the
        device: the estimate at that shape times the measured / estimated ratio of the steps measured."""
        if not peak or not self.longest or self.longest[1] <= max((s[1] for s in self.shapes), default=0):
            return
        ratio = peak / est.peak_bytes if est.peak_bytes else 1.0
        projected = int(self.estimate_longest.peak_bytes * ratio)
        limit = self.device_bytes
        if self.device == "cuda":
            reserved = self.comparison["measured"].get("reserved_peak_bytes") or peak
            projected_total = int(projected * reserved / peak)
        else:
            projected_total = projected
        self.comparison["projection"] = {"shape": list(self.longest), "estimate_bytes": self.estimate_longest.peak_bytes,
                                         "ratio": round(ratio, 4), "projected_bytes": projected,
                                         "projected_device_bytes": projected_total, "limit_bytes": limit}
        if limit and projected_total > limit:
            msg = (f"memplan: the longest batch of the training set ({self.longest[0]} × {self.longest[1]} tokens) is "
                   f"projected to need {_size(projected_total)} (estimate {_size(self.estimate_longest.peak_bytes)}"
                   f" × measured/estimated {ratio:.3f}"
                   f"{' × reserved/allocated' if self.device == 'cuda' else ''}), over the device's "
                   f"{_size(limit)}: it will run out of memory when that batch comes. Shorten max_length, "
                   f"lower the batch size, or see `memplan fit`.")
            self._warn(msg)

    def _warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)
            log.warning(msg)

    # ------------------------------------------------------------------------------------------ profile
    def _write(self, status: str) -> None:
        from memplan.profile.env import environment
        from memplan.profile.schema import profile_filename, profile_key, write_json_atomic

        out = self.output_dir if self.output_dir is not None else str(Path(self.args.output_dir) / "memplan")
        shape = max(self.shapes, key=lambda x: x[0] * x[1]) if self.shapes else self.longest
        train = self.spec.with_(batch_size=max(1, shape[0]), seq_len=max(1, shape[1])).to_dict()
        run = {"device": self.device, "steps": self.steps, "seed": int(getattr(self.args, "seed", 0)),
               "cpu_budget_bytes": self.cpu_budget_bytes, "load_path": "trainer", "source": SOURCE,
               "shapes": [list(s) for s in self.shapes]}
        # one run, one file: the key and the creation time are fixed at the first write
        if getattr(self, "_key", None) is None:
            self._key = profile_key(self.model_spec.name, self.model_spec.hf_config, train, self.device,
                                    {**run, "created": _now()})
            self._created = _now()
        key, created = self._key, self._created
        from memplan.profile.runner import _steady_total

        phases = {k: dict(v) for k, v in self.phases.items()}
        _steady_total(phases)  # "steady": the steps after the first as one phase, as `memplan profile` writes it
        pkey = "allocated_peak_bytes" if self.device == "cuda" else "tracker_peak_bytes"
        best = max((k for k in phases if pkey in phases[k] and not k.startswith("steady_")),
                   key=lambda k: phases[k][pkey], default=None)
        peak = {"phase": best, "bytes": phases[best][pkey], "measure": pkey} if best else None
        if peak and self.device == "cuda":
            peak["allocated_bytes"] = peak["bytes"]
            peak["reserved_bytes"] = max(r.get("reserved_peak_bytes", 0) for r in phases.values())
        meas = {"phases": phases, "peak": peak, "step_times_s": list(self.step_times),
                "tokens_per_step": shape[0] * shape[1] if shape else None}
        self.profile = {
            "schema": "memplan.profile/1", "key": key, "created": created, "status": status,
            "model": {"name": self.model_spec.name, "source": SOURCE, "hf_config": self.model_spec.hf_config},
            "train": train, "run": run, "measurements": meas, "oom": None, "error": None,
            "comparison": {k: v for k, v in (self.comparison or {}).items() if k in ("measured", "estimate", "notes")},
            "environment": environment(self.device), "finished": _now(), "warnings": list(self.warnings),
            "projection": (self.comparison or {}).get("projection"),
        }
        if not out:
            return
        self.path = Path(out) / profile_filename(self.model_spec.name, self.device, key, created)
        write_json_atomic(self.path, self.profile)
        log.info("memplan: profile written to %s", self.path)
