"""Re-run chosen draws of a `memplan validate --against trace --random N --seed S` sample, one at a time, and print
estimate vs trace per phase and per component at the traced peak: the loop for finding an estimator mechanism.

    python scripts/validate_draws.py --seed 2222 --layers 4 155 42 84
    python scripts/validate_draws.py --seed 2222 --layers 4 155 --set dora=False   # vary one field of a draw

Draw indices are the `draw` column of reports/estimate_vs_trace_random.csv (refused combinations are redrawn
inside one index, so the indices match the report's whatever this build refuses). Traces are not cached here.
"""
from __future__ import annotations

import argparse
from dataclasses import replace


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return tuple(text.split("+")) if "+" in text else text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("draws", nargs="+", type=int)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--set", action="append", default=[], help="FIELD=VALUE applied to each drawn TrainSpec")
    args = p.parse_args()

    from memplan.catalog import models
    from memplan.estimate import estimate
    from memplan.trace import run_trace
    from memplan.validation.against_trace import traced_view
    from memplan.validation.sample import capped_name, draw_configs, resolve_sampled

    names = [m["name"] for m in models().values()]
    wanted, found = set(args.draws), {}
    for index, name, train in draw_configs(args.seed, names):
        if index in wanted:
            found[index] = (name, train)
        if len(found) == len(wanted) or index > max(wanted):
            break
    gib = 2**30
    for index in args.draws:
        name, train = found[index]
        train = replace(train, **{k: _value(v) for k, v in (s.split("=", 1) for s in args.set)})
        model = resolve_sampled(capped_name(name, args.layers))
        est = traced_view(estimate(model, train).to_dict())
        tr = run_trace(model, train, keep_timeline=False, steps=1, warm_optimizer=True).to_dict()
        err = (est["peak_bytes"] - tr["peak_bytes"]) / tr["peak_bytes"]
        print(f"#{index} {name} ({model.num_layers} layers) {train.to_dict()}")
        print(f"  peak: trace {tr['peak_bytes'] / gib:.3f} GiB ({tr['peak_phase']}), estimate "
              f"{est['peak_bytes'] / gib:.3f} GiB ({est['peak_phase']}), error {err:+.2%}")
        for phase in tr["phases"]:
            print(f"  {phase:<10} trace {tr['phases'][phase] / gib:9.3f}  estimate {est['phases'][phase] / gib:9.3f}")
        comps = sorted(set(tr["components"]) | set(est["components"]))
        print("  at each peak:  component             trace GiB   estimate GiB")
        for c in comps:
            print(f"  {c:<30} {tr['components'].get(c, 0) / gib:9.3f}  {est['components'].get(c, 0) / gib:9.3f}")


if __name__ == "__main__":
    main()
