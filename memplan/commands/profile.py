"""`memplan profile`: real training steps, measured per phase, side by side with the estimate and the trace."""
from __future__ import annotations

import json
import os
import re
import sys

from memplan.errors import MemplanError
from memplan.options import add_train_flags, grid_from_args, varying_fields

GiB = 2**30
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]i?b?|b)?\s*$", re.I)
_MULT = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "ki": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
         "mi": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30, "gi": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40,
         "ti": 2**40}


def parse_bytes(text: str) -> int:
    """"123", "512MiB", "2GiB", "1.5g" -> bytes (binary units: GB and GiB both mean 2^30 here)."""
    m = _SIZE.match(str(text))
    if not m:
        raise MemplanError(f"expected a size in bytes (e.g. 2GiB, 512MiB, 1000000), got {text!r}")
    value = int(float(m.group(1)) * _MULT[(m.group(2) or "").lower()])
    if value <= 0:
        raise MemplanError(f"a size must be positive, got {text!r}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="run real training steps (CUDA or CPU) and measure memory per phase",
        description="Run N real QLoRA/LoRA training steps the way users train (from_pretrained with "
                    "BitsAndBytesConfig, PEFT LoRA, the chosen optimizer, random tokens) in a child process per "
                    "configuration, measure every phase, and print measured vs estimate (and trace). "
                    "Weights are random, written from the config (memory does not depend on weight values), "
                    "or your own safetensors checkpoint with --weights. With --gpus N, one process per rank "
                    "through accelerate launch and a config file made from the flags (FSDP2 / DDP, or DeepSpeed "
                    "ZeRO on CUDA; NCCL on CUDA, gloo on the CPU) and every rank's peaks in one profile. Sizes are GiB (2^30 bytes).")
    p.add_argument("model", nargs="*", metavar="MODEL",
                   help="catalog name, config.json path or model folder (comma-separated or several: a grid); "
                        "optional with --weights")
    add_train_flags(p)
    g = p.add_argument_group("profile run")
    g.add_argument("--steps", type=int, default=3, help="training steps per configuration (default: 3; the "
                   "steps after the first are the steady state)")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="cuda (GPU measurements) | cpu (live tensor bytes + RSS) | auto (cuda if present)")
    g.add_argument("--weights", metavar="DIR", help="your own checkpoint folder (config.json + *.safetensors; "
                   "pickle checkpoints are refused) instead of random weights")
    # --trust-remote-code comes with the shared training flags (memplan/options.py)
    g.add_argument("--load", dest="load_path", default="pretrained", choices=("pretrained", "direct"),
                   help="pretrained: from_pretrained on a safetensors folder (the user's path, default) | "
                        "direct: meta-init, then random weights created and quantized on the device layer by "
                        "layer (no disk; same tensors; used by scripts/gpu_validate.sh)")
    g.add_argument("--weights-cache", metavar="DIR",
                   help="where random-weight checkpoints are cached, by config hash (default: "
                        "$MEMPLAN_WEIGHTS_CACHE or ~/.cache/memplan/random-weights)")
    g.add_argument("--clean-cache", action="store_true",
                   help="remove cached random-weight checkpoints (with --older-than DAYS: only older ones) and exit "
                        "if no MODEL is given")
    g.add_argument("--older-than", type=float, metavar="DAYS", help="with --clean-cache")
    g.add_argument("--list-cache", action="store_true", help="list cached random-weight checkpoints and exit")
    g.add_argument("--cpu-budget", metavar="BYTES", help="CPU: simulate a device of this many bytes; the "
                   "tracker raises an out-of-memory error where a GPU would (e.g. 2GiB)")
    g.add_argument("--memory-fraction", type=float, metavar="F",
                   help="CUDA: torch.cuda.set_per_process_memory_fraction(F) before loading (simulate a smaller GPU)")
    g.add_argument("--kernels", default="native", choices=("native", "gpu"),
                   help="CPU only: native (what really runs on the CPU) | gpu (the trace's models of the CUDA "
                        "kernels' memory: fused attention, fused dropout, bitsandbytes' CUDA 4-bit matmul path; "
                        "makes the CPU profile byte-comparable with the trace)")
    g.add_argument("--profiles", default="profiles", metavar="DIR", help="where profiles are kept (default: "
                   "profiles/)")
    g.add_argument("--csv", default=os.path.join("reports", "profiles.csv"), metavar="PATH",
                   help="CSV log, one row per run (default: reports/profiles.csv; 'none' to skip)")
    g.add_argument("--force", action="store_true", help="run configurations already in the profiles folder again")
    g.add_argument("--timeout", type=float, metavar="S", help="per configuration: stop a child after S seconds")
    g.add_argument("--time-budget", type=float, metavar="S",
                   help="whole grid: start no configuration that would not finish within S seconds")
    g.add_argument("--no-trace", action="store_true", help="do not run the meta trace for comparison")
    g.add_argument("--threads", type=int, help="torch threads in the child (CPU)")
    g.add_argument("--log-dir", metavar="DIR", help="keep each child's full output here")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--show", nargs="+", metavar="PROFILE",
                   help="print stored profiles (JSON files or folders) instead of running; with --recompare, "
                        "compute the estimate and trace comparison again (e.g. for GPU profiles measured with "
                        "--no-trace) and rewrite the files atomically")
    g.add_argument("--recompare", action="store_true", help="with --show")
    g.add_argument("--json", action="store_true", help="print the profiles as JSON (one per line)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    from memplan.profile.env import detect_gpus

    gpus, _, _ = detect_gpus()
    return "cuda" if gpus else "cpu"


def _visible_gpus(device: str) -> int | None:
    """How many GPUs a CUDA run can use (NVML / nvidia-smi, then CUDA_VISIBLE_DEVICES); None on the CPU."""
    if device != "cuda":
        return None
    from memplan.profile.env import detect_gpus

    gpus, _, _ = detect_gpus()
    listed = [e for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return min(len(gpus), len(listed)) if listed and os.environ.get("CUDA_VISIBLE_DEVICES") is not None \
        else len(gpus)


def build_configs(args) -> list:
    from memplan.catalog import resolve_model
    from memplan.profile.grid import Config

    refs = [r for ref in (args.model or []) for r in ref.split(",") if r.strip()]
    weights = None
    if args.weights:
        from memplan.profile.loading import check_weights_dir, pickle_files

        weights = str(check_weights_dir(args.weights).resolve())
        ignored = pickle_files(weights)
        if ignored:
            print(f"memplan profile: --weights {args.weights}: loading the safetensors weights only; pickle files "
                  f"never read: {', '.join(ignored[:5])}{' ...' if len(ignored) > 5 else ''}", file=sys.stderr)
        if not refs:
            refs = [weights]
    from memplan.options import from_config

    mapping = from_config(args)
    if not refs and mapping is not None and mapping.model:
        refs = [mapping.model]
    if not refs:
        raise MemplanError("name a MODEL (catalog name, config.json or folder), or give --weights DIR or --from FILE")
    if weights and len(refs) > 1:
        raise MemplanError("--weights profiles one model: give at most one MODEL with it")
    device = _device(args.device)
    if device == "cpu" and args.memory_fraction:
        raise MemplanError("--memory-fraction is for --device cuda; on the CPU use --cpu-budget")
    if device == "cuda" and args.cpu_budget:
        raise MemplanError("--cpu-budget is for --device cpu; on CUDA use --memory-fraction")
    if args.steps < 1:
        raise MemplanError("--steps must be at least 1")
    specs = grid_from_args(args)
    if not specs:
        from memplan.spec import TrainSpec

        specs = [TrainSpec()]
    from memplan.stack import check_runs_installed

    from memplan.profile.multi import why_not

    visible = _visible_gpus(device) if any(t.strategy != "none" for t in specs) else None
    for train in specs:  # a profile measures the installed stack (its versions are recorded in the profile)
        check_runs_installed(train.transformers, "profile")
        why = why_not(train, device, visible)  # --gpus N: one process per rank (memplan/profile/multi.py)
        if why:
            raise MemplanError(why)
    varying = varying_fields(specs)
    configs = []
    for ref in refs:
        # a config asking for remote code (auto_map) is refused here unless --trust-remote-code
        model = resolve_model(weights if weights else ref.strip(), trust_remote_code=args.trust_remote_code)
        if mapping is not None:
            from memplan.integrations.config import check_targets
            from memplan.options import _given, print_mapping_once

            check_targets(mapping, model, _given(args))
            print_mapping_once(args)
        name = model.name if not weights or ref == weights else ref.strip()
        for train in specs:
            run = {"steps": args.steps, "load_path": args.load_path, "seed": args.seed,
                   "weights_dir": weights, "weights_cache": args.weights_cache,
                   "cpu_budget_bytes": parse_bytes(args.cpu_budget) if args.cpu_budget else None,
                   "memory_fraction": args.memory_fraction,
                   "kernels": args.kernels if device == "cpu" else None}
            label = name + "".join(f" {k}={v}" for k, v in train.to_dict().items() if k in varying)
            configs.append(Config(name, dict(model.hf_config), model.source, train.to_dict(), device, run,
                                  label=label))
    return configs


def run(args) -> int:
    from memplan.profile import weights as rw

    if args.list_cache:
        for e in rw.list_cache(args.weights_cache):
            print(f"{e['bytes'] / GiB:9.2f} GiB  {'complete' if e['complete'] else 'PARTIAL '}  {e['path']}")
        return 0
    if args.clean_cache:
        removed = rw.clean_cache(args.weights_cache, older_than_days=args.older_than)
        print(f"removed {len(removed)} cached checkpoint(s) from {args.weights_cache or rw.default_cache_dir()}")
        if not args.model and not args.weights:
            return 0
    if args.show:
        return show_profiles(args)
    from memplan.outputs import output_dir, output_path

    csv_path = None if str(args.csv).lower() == "none" else args.csv
    if csv_path:
        # only the default CSV's folder is created; an explicit path's folder must exist (memplan/outputs.py)
        output_path(csv_path, "--csv", make_parents=csv_path == os.path.join("reports", "profiles.csv"))
    configs = build_configs(args)
    output_dir(args.profiles, "--profiles")  # created only once the configurations are known to be valid
    if args.log_dir:
        output_dir(args.log_dir, "--log-dir")
    from memplan.profile.grid import run_grid

    printed = []

    def show(outcome):
        printed.append(outcome)
        if args.json:
            if outcome.profile is not None:
                print(json.dumps({k: v for k, v in outcome.profile.items() if k != "_path"}))
        elif len(configs) == 1:
            print_outcome(outcome)

    try:
        outcomes = run_grid(configs, args.profiles, csv_path, force=args.force, timeout_s=args.timeout,
                            time_budget_s=args.time_budget, progress=not (args.no_progress or args.json),
                            on_outcome=show, log_dir=args.log_dir, trace=not args.no_trace,
                            # a native model_type runs transformers' code (trust_remote_code=False) whatever the
                            # flag: its auto_map was dropped when the config was read (catalog/hfconfig.py)
                            trust_remote_code=args.trust_remote_code and any(c.hf_config.get("auto_map")
                                                                             for c in configs),
                            threads=args.threads)
    except KeyboardInterrupt:
        print("memplan profile: interrupted; measured profiles were kept", file=sys.stderr)
        if len(configs) > 1 and not args.json:
            print_summary(printed)
        return 130
    skipped = [o for o in outcomes if o.status == "skipped"]
    if skipped and not args.json:
        print(f"skipped {len(skipped)} configuration(s) already profiled in {args.profiles} (--force runs them "
              "again)", file=sys.stderr)
        if len(configs) == 1:
            print_outcome(skipped[0])
    if len(configs) > 1 and not args.json:
        print_summary(outcomes)
    bad = [o for o in outcomes if o.status in ("error", "crashed")]
    return 1 if bad else 0


def show_profiles(args) -> int:
    from pathlib import Path

    from memplan.profile.grid import Config, Outcome
    from memplan.profile.schema import read_profile, read_profiles, write_json_atomic

    profiles = []
    for ref in args.show:
        path = Path(ref)
        if path.is_dir():
            profiles += read_profiles(path)  # a bad file: one line naming it on stderr, then skipped
        else:
            p = read_profile(path)
            if p is not None:
                profiles.append(p)
    if not profiles:
        raise MemplanError("no valid profile among " + ", ".join(args.show))
    outcomes = []
    for prof in profiles:
        if args.recompare and prof["status"] in ("ok", "oom"):
            from memplan.profile.compare import compare

            if prof["model"]["hf_config"].get("auto_map") and not args.trust_remote_code:
                print(f"memplan: not recomparing {prof['_path']}: its config asks for remote code (auto_map); "
                      "give --trust-remote-code", file=sys.stderr)
            else:
                job = {"model": prof["model"], "train": prof["train"], "trace": not args.no_trace}
                try:
                    prof["comparison"] = compare(job, prof)
                except Exception as e:  # noqa: BLE001 - one profile must not stop the report
                    print(f"memplan: not recomparing {prof['_path']}: {e.__class__.__name__}: "
                          f"{' '.join(str(e).split())}"[:400], file=sys.stderr)
                else:
                    path = prof.pop("_path")
                    write_json_atomic(path, prof)
                    prof["_path"] = path
        cfg = Config(prof["model"]["name"], prof["model"]["hf_config"], prof["model"].get("source") or "",
                     prof["train"], prof["run"].get("device", "cpu"), {k: v for k, v in prof["run"].items()
                                                                      if k != "device"}, key=prof["key"],
                     label=prof["model"]["name"] + _layout(prof))
        outcomes.append(Outcome(cfg, prof["status"], prof, prof.get("_path")))
    if args.json:
        for o in outcomes:
            print(json.dumps({k: v for k, v in o.profile.items() if k != "_path"}))
    elif len(outcomes) == 1:
        print_outcome(outcomes[0])
    else:
        print_summary(outcomes)
    return 0


def _layout(prof: dict) -> str:
    """" 2×fsdp" for a multi-GPU profile, "" for one process."""
    par = prof["run"].get("parallel") or {}
    return f" {par['gpus']}×{par['strategy']}" if par.get("gpus") else ""


# ------------------------------------------------------------------------------------------------ printing

_UNIT = [GiB, "GiB (2^30 bytes)"]


def _set_unit(max_bytes) -> str:
    """GiB, or MiB for small (CPU test) models, so that the figures keep their digits."""
    _UNIT[:] = [GiB, "GiB (2^30 bytes)"] if (max_bytes or 0) >= GiB / 4 else [2**20, "MiB (2^20 bytes)"]
    return _UNIT[1]


def _g(b) -> str:
    return "" if b is None else f"{b / _UNIT[0]:.3f}"


def _pct(x) -> str:
    return "" if x is None else f"{x:+.1f}%"


def print_outcome(outcome) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cfg, prof = outcome.config, outcome.profile
    if prof is None:
        console.print(f"[bold red]{cfg.label or cfg.model_name}: {outcome.status}[/] (child exit status "
                      f"{outcome.returncode}); last output:")
        for line in outcome.log_tail[-15:]:
            console.print("  " + line, markup=False, highlight=False)
        return
    meas, cmp_ = prof["measurements"], prof.get("comparison") or {}
    cuda = prof["run"]["device"] == "cuda"
    est, tr = cmp_.get("estimate") or {}, cmp_.get("trace") or {}
    title = f"{prof['model']['name']} on {prof['run']['device']}: {prof['status']}"
    unit = _set_unit((meas.get("peak") or {}).get("bytes"))
    t = Table(title=title + f" — {unit}; err = (predicted - measured) / measured")
    t.add_column("phase")
    if cuda:
        for c in ("allocated peak", "reserved peak", "NVML used peak"):
            t.add_column(c, justify="right")
    else:
        for c in ("tensor peak", "RSS peak"):
            t.add_column(c, justify="right")
    for c in ("estimate", "err", "trace", "err", "seconds"):
        t.add_column(c, justify="right")
    est_ph, tr_ph = est.get("phases") or {}, tr.get("phases") or {}
    measured_ph = (cmp_.get("measured") or {}).get("phases") or {}
    for name, rec in meas["phases"].items():
        if name.startswith("steady_"):
            continue  # the steady state's sub-phases stay in the JSON; one row for the steady state here
        if cuda:
            cells = [_g(rec.get("allocated_peak_bytes")), _g(rec.get("reserved_peak_bytes")),
                     _g(rec.get("nvml_process_peak_bytes"))]
        else:
            cells = [_g(rec.get("tracker_peak_bytes")), _g(rec.get("rss_peak_bytes"))]
        m = measured_ph.get(name)
        e, r = est_ph.get(name), tr_ph.get(name)
        from memplan.profile.compare import pct

        t.add_row(name, *cells, _g(e), _pct(pct(e, m)) if m is not None else "", _g(r),
                  _pct(pct(r, m)) if m is not None else "", f"{rec.get('seconds') or 0:.2f}")
    peak = meas.get("peak") or {}
    t.add_section()
    if cuda:
        cells = [_g(peak.get("allocated_bytes")), _g(peak.get("reserved_bytes")), _g(peak.get("nvml_process_bytes"))]
    else:
        cells = [_g(peak.get("tracker_bytes")), _g(peak.get("rss_bytes"))]
    t.add_row(f"peak ({peak.get('phase', '-')})", *cells, _g(est.get("peak_bytes")), _pct(est.get("error_pct")),
              _g(tr.get("peak_bytes")), _pct(tr.get("error_pct")), "")
    if cuda and est.get("device_total_bytes") is not None:
        t.add_row("device total (NVML)", "", "", _g(peak.get("nvml_process_bytes")), _g(est.get("device_total_bytes")),
                  _pct(est.get("device_total_error_pct")), "", "", "")
    console.print(t)
    lines = []
    versions = (prof.get("environment") or {}).get("versions") or {}
    if versions:  # the stack the profile measured (memplan/stack.py names the same packages)
        lines.append("stack: " + " · ".join(f"{p} {versions.get(p) or 'none'}"
                                            for p in ("transformers", "peft", "bitsandbytes", "torch")))
    if cuda and meas.get("cuda_context_bytes") is not None:
        lines.append(f"CUDA context {_g(meas['cuda_context_bytes'])} GiB (NVML before/after CUDA init)")
    if meas.get("steady_step_time_s"):
        lines.append(f"step {meas['steady_step_time_s']:.3f} s, {meas.get('tokens_per_s') or 0:,.0f} tokens/s "
                     f"({'steady state' if len(meas.get('step_times_s', [])) > 1 else 'first step'})")
    unit_name = _UNIT[1].split()[0]
    if prof.get("ranks"):
        lines += _rank_lines(prof, cuda, unit_name)
    if prof.get("oom"):
        o = prof["oom"]
        on = f" on rank {o['rank']}" if o.get("rank") is not None else ""
        lines.append(f"[bold red]out of memory[/]{on} in {o.get('phase')}: asked for {_g(o.get('requested_bytes'))} "
                     f"{unit_name}" + (f" with {_g(o.get('live_bytes'))} {unit_name} live of a "
                                       f"{_g(o.get('budget_bytes'))} {unit_name} budget" if o.get("budget_bytes")
                                       else ""))
    if prof.get("error"):
        on = f" on rank {prof['error']['rank']}" if prof["error"].get("rank") is not None else ""
        lines.append(f"[bold red]error[/]{on} in {prof['error'].get('phase')}: {prof['error']['type']}: "
                     f"{prof['error']['message'][:300]}")
    for k in ("estimate", "trace"):
        if (cmp_.get(k) or {}).get("note"):
            lines.append(f"{k}: {cmp_[k]['note']}")
    if (cmp_.get("trace") or {}).get("peak_bytes") is not None and not cuda and prof["run"].get("kernels") != "gpu":
        lines.append("the trace models the CUDA kernels (fused attention, 1-byte dropout masks); this CPU run used "
                     "the CPU's own: --kernels gpu measures the trace's kernel models on real tensors")
    if not cuda:
        lines.append("CPU: tensor peak = live tensor bytes (the trace's tracker on real tensors); RSS includes the "
                     "interpreter and libraries" + (" ; kernels: the trace's GPU-kernel models"
                                                     if prof["run"].get("kernels") == "gpu" else ""))
    path = outcome.path or prof.get("_path")
    if path:
        lines.append(f"profile: {path}")
    for line in lines:
        console.print(line, highlight=False)


def _rank_lines(prof: dict, cuda: bool, unit_name: str) -> list[str]:
    """A multi-GPU profile: the layout, then each rank's status and peak (the table above is rank 0's)."""
    par = prof["run"].get("parallel") or {}
    key = "allocated_peak_bytes" if cuda else "tracker_peak_bytes"
    lines = [f"{par.get('gpus')} ranks, {par.get('strategy')} ({par.get('backend')}); the table is rank 0's; "
             f"each rank's peak ({'allocated' if cuda else 'tensor'} {unit_name}):"]
    for r in prof["ranks"]:
        best = max(((v.get(key) or 0, name) for name, v in r["phases"].items() if not name.startswith("steady_")),
                   default=(None, "-"))
        reserved = max((v.get("reserved_peak_bytes") or 0 for v in r["phases"].values()), default=0) if cuda else 0
        lines.append(f"  rank {r['rank']}: {r['status']}, peak {_g(best[0])} in {best[1]}"
                     + (f", reserved {_g(reserved)}" if reserved else ""))
    return lines


def print_summary(outcomes) -> None:
    from rich.console import Console
    from rich.table import Table

    peaks = [((o.profile or {}).get("measurements") or {}).get("peak", {}).get("bytes") or 0 for o in outcomes]
    unit = _set_unit(max(peaks, default=0))
    t = Table(title=f"profiles — {unit}; err = (predicted - measured) / measured")
    for c in ("configuration", "status", "measured peak", "phase", "estimate", "err", "trace", "err", "tokens/s"):
        t.add_column(c, justify="left" if c in ("configuration", "status", "phase") else "right")
    for o in outcomes:
        prof = o.profile or {}
        peak = (prof.get("measurements") or {}).get("peak") or {}
        cmp_ = prof.get("comparison") or {}
        est, tr = cmp_.get("estimate") or {}, cmp_.get("trace") or {}
        status = o.status if o.status != "skipped" else f"skipped ({prof.get('status')})"
        if prof.get("oom"):
            status += f" in {prof['oom'].get('phase')}"
        tps = (prof.get("measurements") or {}).get("tokens_per_s")
        t.add_row(o.config.label or o.config.model_name, status, _g(peak.get("bytes")), peak.get("phase") or "",
                  _g(est.get("peak_bytes")), _pct(est.get("error_pct")), _g(tr.get("peak_bytes")),
                  _pct(tr.get("error_pct")), f"{tps:,.0f}" if tps else "")
    Console().print(t)
