"""`memplan validate --against trace --random N --seed S`: the estimate against the meta trace on a seeded random
sample over every training flag (the table in sample.py), the estimator's yardstick.

Draws configurations from the seed until N of them are traced. A combination the trace refuses on this stack
(sample.refusal: Liger on a model type it does not patch, a fused loss on a wrapped output layer; TrainSpec's own
refusals) is drawn again, and the summary counts the redraws by reason. A flag value the trace cannot run in this build
(SUSPECTS: probed once per run on the smallest catalog model, so a value the trace learns joins the sample by
itself) is skipped with the probe's error as the reason, listed in the CSV and the summary, never silently.
Traces come from validate's cache (reports/.trace_cache/, keyed by model and TrainSpec), so reruns and a changed
estimator cost only the estimate. Each trace runs one steady-state step after a warm optimizer step
(run_trace(steps=1, warm_optimizer=True): the peaks of two steps at half the cost).

Writes the CSV (one row per draw: status ok | skipped | failed, the model and its type, every TrainSpec field, the
trace and estimate peaks, the peak error (estimate - trace) / trace, each phase's error and each component's
error as a share of the traced peak), a figure (peak error by model type), and prints the summary line: seed, N,
the library stack, median and worst |peak error|, the worst rows, and the bar (worst <= 3%, median <= 0.5%).
"""
from __future__ import annotations

import statistics
from pathlib import Path

from memplan.errors import MemplanError

BAR_WORST, BAR_MEDIAN = 0.03, 0.005
PROBE_MODEL = "qwen2.5-0.5b"  # the smallest catalog model, capped at 2 layers: a probe trace costs seconds
# Flag values the trace could not run when this table was written (issue #11): each is probed before the sample.
SUSPECTS = [("bits", 8), ("optimizer", "adafactor")]
STACK = ("torch", "transformers", "peft", "bitsandbytes")


def stack_versions() -> dict[str, str | None]:
    """The installed versions the traces ran with (memplan/stack.py reads them from package metadata)."""
    from memplan.stack import installed

    have = installed()
    return {name: have.get(name) for name in STACK}


def _job(name: str, train, args) -> tuple:
    return (name, train.to_dict(), args.cache, not args.no_cache)


def probe_untraceable(args, console) -> dict[tuple[str, object], str]:
    """{(field, value): why} for each suspect value whose probe trace fails in this build."""
    from memplan.commands.validate import _trace_one
    from memplan.spec import TRAIN_FIELDS, TrainSpec
    from memplan.validation.sample import capped_name

    out = {}
    for field, value in SUSPECTS:
        if field not in TRAIN_FIELDS:
            continue
        try:
            train = TrainSpec(**{field: value, "seq_len": 64})
        except MemplanError as e:
            out[(field, value)] = str(e)
            continue
        res = _trace_one(_job(capped_name(PROBE_MODEL, 2), train, args))
        if "error" in res:
            out[(field, value)] = res["error"].splitlines()[0][:300]
            console.print(f"[dim]probe {field}={value}: the trace cannot run it ({out[(field, value)][:120]})[/]",
                          highlight=False)
    return out


def _fmt_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v)) or "none"
    return str(v)


def label(row: dict, fields: list[str]) -> str:
    return f"#{row['draw']} {row['model']} " + " ".join(f"{f}={_fmt_value(row[f])}" for f in fields)


def run_random(args) -> int:
    from rich.console import Console

    from memplan.catalog import models, resolve_model
    from memplan.commands.validate import COMPONENTS, _trace_one, compare
    from memplan.estimate import estimate
    from memplan.outputs import output_path
    from memplan.spec import TRAIN_FIELDS, TrainSpec
    from memplan.validation.sample import capped_name, draw_configs, resolve_sampled, skipped_rows

    if args.random < 1:
        raise MemplanError("--random needs a positive number of configurations")
    if args.layers is not None and args.layers < 1:
        raise MemplanError("--layers needs a positive number of layers")
    csv_path = output_path(args.csv or "reports/estimate_vs_trace_random.csv", "--csv", make_parents=args.csv is None)
    # the summary beside the CSV (seed, stack, bar, refused combinations): the report's header
    header = output_path(csv_path.with_suffix(".txt"), "--csv")
    figure = None if args.figure is not None and str(args.figure).lower() == "none" else \
        output_path(args.figure or "reports/estimate_vs_trace_random.png", "--figure", make_parents=args.figure is None)
    names = [m["name"] for m in models().values()] if not args.models else \
        [resolve_model(n.strip()).name for n in args.models.split(",") if n.strip()]
    console = Console(stderr=True)
    untraceable = probe_untraceable(args, console)

    draws, jobs, refused = [], [], {}  # draws: (index, name, train, skip reason or None)
    for index, name, train in draw_configs(args.seed, names, refused=refused):
        why = next((w for (f, v), w in untraceable.items() if getattr(train, f) == v), None)
        draws.append((index, name, train, why))
        if why is None:
            jobs.append(_job(capped_name(name, args.layers), train, args))
            if len(jobs) == args.random:
                break
    results = _trace_all(jobs, args.jobs, console)

    rows, by_draw = [], iter(results)
    for index, name, train, why in draws:
        model = resolve_sampled(capped_name(name, args.layers))
        row = {"draw": index, "status": "ok", "reason": "", "model": name, "model_type": model.model_type,
               "layers": model.num_layers, **{f: _fmt_value(v) for f, v in train.to_dict().items()}}
        if why is not None:
            rows.append({**row, "status": "skipped", "reason": why})
            continue
        tr = next(by_draw)
        if "error" in tr:
            rows.append({**row, "status": "failed", "reason": tr["error"].splitlines()[0][:300]})
            continue
        est = traced_view(estimate(model, train).to_dict())
        numbers = {k: v for k, v in compare(est, tr).items() if k not in row and k not in TRAIN_FIELDS
                   and k not in ("model", "checkpointing")}
        numbers["estimate_peak_with_load_bytes"] = est["estimate_peak_with_load_bytes"]
        rows.append({**row, **numbers})
    _write_csv(csv_path, rows, COMPONENTS)
    ok = [r for r in rows if r["status"] == "ok"]
    out = Console()
    lines = summary(rows, args.seed, args.random, skipped_rows(), args.layers, refused)
    for line in lines:
        out.print(line, highlight=False)
    out.print(f"wrote {csv_path}", highlight=False)
    header.write_text("\n".join(lines) + "\n")
    out.print(f"wrote {header}", highlight=False)
    if figure is not None and ok:
        try:
            error_by_type(ok, str(figure), lines[0])
            out.print(f"wrote {figure}", highlight=False)
        except ImportError:
            out.print("figure skipped: matplotlib is not installed (pip install 'memplan[plot]')", highlight=False)
    errs = [abs(r["peak_error"]) for r in ok]
    failed = any(r["status"] == "failed" for r in rows)
    return 0 if errs and not failed and max(errs) <= BAR_WORST and statistics.median(errs) <= BAR_MEDIAN else 1


def traced_view(est: dict) -> dict:
    """The estimate as the trace can see it. The trace starts from the loaded model (trace/runner.py registers the
    finished model, then runs the step), so it never sees loading: the estimate's load transient
    (weights.load_transient: a weight in its load dtype beside its quantized or upcast copy, one tensor at a time
    while from_pretrained / prepare_model_for_kbit_training run) is left out of the compared load phase, and the
    estimate's own peak, with it, is kept as estimate_peak_with_load_bytes."""
    load = est["phase_components"]["load"]
    transient = load.get("temporaries", 0)
    if not transient:
        return {**est, "estimate_peak_with_load_bytes": est["peak_bytes"]}
    phases = {**est["phases"], "load": est["phases"]["load"] - transient}
    peak_phase = max(phases, key=phases.get)
    components = {**load, "temporaries": 0} if peak_phase == "load" else est["phase_components"][peak_phase]
    return {**est, "phases": phases, "peak_phase": peak_phase, "peak_bytes": phases[peak_phase],
            "components": components, "estimate_peak_with_load_bytes": est["peak_bytes"]}


def _trace_all(jobs: list[tuple], n_jobs: int, console) -> list[dict]:
    """Trace every job (validate's cached _trace_one), in n_jobs spawned processes when n_jobs > 1: the grid, the
    multi-GPU sample and the random sample all run here."""
    from memplan.commands.validate import _trace_one

    results = []
    if n_jobs > 1:
        import multiprocessing as mp

        # a fresh worker every 8 traces: a full-depth model's meta trace leaves its process's heap grown
        with mp.get_context("spawn").Pool(n_jobs, maxtasksperchild=8) as pool:
            for i, res in enumerate(pool.imap(_trace_one, jobs)):
                results.append(res)
                console.print(f"[dim]{i + 1}/{len(jobs)} {res['model']}[/]", highlight=False)
    else:
        for i, job in enumerate(jobs):
            results.append(_trace_one(job))
            console.print(f"[dim]{i + 1}/{len(jobs)} {job[0]}[/]", highlight=False)
    return results


def _write_csv(path: Path, rows: list[dict], components) -> None:
    import csv

    fields: list[str] = []
    for r in rows:  # ok rows carry the numbers; keep the columns in first-seen order
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})


def summary(rows: list[dict], seed: int, n: int, not_in_build: list[str], layers: int | None = None,
            refused: dict | None = None) -> list[str]:
    """The summary line, then the worst rows, the spread by model type, skips and failures."""
    from memplan.spec import TRAIN_FIELDS

    ok = [r for r in rows if r["status"] == "ok"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    failed = [r for r in rows if r["status"] == "failed"]
    stack = ", ".join(f"{k} {v}" for k, v in stack_versions().items())
    if not ok:
        return [f"seed {seed}: no configuration traced ({len(skipped)} skipped, {len(failed)} failed); {stack}"]
    errs = [abs(r["peak_error"]) for r in ok]
    med, worst = statistics.median(errs), max(errs)
    verdict = "PASS" if worst <= BAR_WORST and med <= BAR_MEDIAN and not failed else "FAIL"
    over = sum(e > BAR_WORST for e in errs)
    depth = f" (decoders capped at {layers} layers)" if layers else ""
    n_types = len({r["model_type"] for r in ok})
    lines = [f"seed {seed}, N {n}: {len(ok)} configurations traced{depth} over {n_types} model "
             f"types ({len(skipped)} drawn and skipped, {len(failed)} failed); |peak error| median {med:.2%}, "
             f"worst {worst:.2%}, {over} beyond 3%; bar: worst <= 3%, median <= 0.5%: {verdict}; {stack}"]
    varying = [f for f in TRAIN_FIELDS if len({r[f] for r in ok}) > 1]
    lines.append("worst rows (peak error, trace peak GiB, trace / estimate peak phase):")
    for r in sorted(ok, key=lambda r: -abs(r["peak_error"]))[:5]:
        lines.append(f"  {r['peak_error']:+.2%} {r['trace_peak_bytes'] / 2**30:.2f} GiB "
                     f"{r['trace_peak_phase']}/{r['estimate_peak_phase']}: {label(r, varying)}")
    by_type: dict[str, list[float]] = {}
    for r in ok:
        by_type.setdefault(r["model_type"], []).append(abs(r["peak_error"]))
    lines.append("by model type (n, median, worst): " + "; ".join(
        f"{t} {len(v)} {statistics.median(v):.2%} {max(v):.2%}" for t, v in sorted(by_type.items())))
    reasons: dict[str, int] = {}
    for r in skipped:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    for why, count in reasons.items():
        lines.append(f"skipped {count} drawn configurations the trace cannot run: {why}")
    for r in failed:
        lines.append(f"trace failed: {label(r, varying)}: {r['reason']}")
    for why, count in sorted((refused or {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"redrawn {count} refused combinations: {why.splitlines()[0][:200]}")
    if not_in_build:
        lines.append(f"sample table rows not in this build's TrainSpec (not drawn): {', '.join(not_in_build)}")
    return lines


def error_by_type(rows: list[dict], path: str, title: str) -> None:
    """Peak error (%) of every traced configuration, one column per model type, with the +-3% bar."""
    from memplan.report.plots import _pyplot, _save

    plt = _pyplot()
    types = sorted({r["model_type"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(types) + 2), 4))
    for i, t in enumerate(types):
        ys = [100 * r["peak_error"] for r in rows if r["model_type"] == t]
        xs = [i + 0.25 * ((j * 0.618) % 1 - 0.5) for j in range(len(ys))]
        ax.scatter(xs, ys, s=10, alpha=0.7)
    for y in (-3, 3):
        ax.axhline(y, color="grey", ls="--", lw=0.8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_ylabel("estimate vs trace peak error (%)")
    ax.set_title(title.split(";")[0], fontsize=8)
    _save(fig, path)
    plt.close(fig)
