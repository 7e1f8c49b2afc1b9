"""Estimate vs trace on the draws of a `memplan validate --random` sample that offload all activations, on derived
architectures, Falcon and MoE models (issue #11's offload-all rows), each at 4 layers: a fresh-seed check.

    python scripts/validate_offload_all.py --seed 114083 --count 30
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--count", type=int, default=30)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()

    from memplan.catalog import models
    from memplan.estimate import estimate
    from memplan.trace import run_trace
    from memplan.validation.against_trace import traced_view
    from memplan.validation.sample import capped_name, draw_configs, resolve_sampled

    names = [m["name"] for m in models().values()]
    errors = []
    for index, name, train in draw_configs(args.seed, names):
        if train.activation_offload != "all":
            continue
        model = resolve_sampled(capped_name(name, args.layers))
        moe = any(layer.mlp == "moe" for _, layer in model.layers)
        if not (model.derived or model.model_type == "falcon" or moe):
            continue
        t0 = time.perf_counter()
        est = traced_view(estimate(model, train).to_dict())
        tr = run_trace(model, train, keep_timeline=False, steps=1, warm_optimizer=True)
        err = est["peak_bytes"] / tr.peak_bytes - 1
        errors.append((abs(err), index))
        kind = "derived" if model.derived else "falcon" if model.model_type == "falcon" else "moe"
        print(f"#{index} {name} [{kind}] {err:+.2%} (trace {tr.peak_phase}, estimate {est['peak_phase']}) "
              f"{train.to_dict()} {time.perf_counter() - t0:.0f}s", flush=True)
        if len(errors) >= args.count:
            break
    errors.sort()
    print(f"seed {args.seed}: {len(errors)} rows, median {errors[len(errors) // 2][0]:.2%}, worst {errors[-1][0]:.2%} "
          f"(#{errors[-1][1]}), {sum(e > 0.03 for e, _ in errors)} beyond 3%; {tr.stack_line}")


if __name__ == "__main__":
    main()
