"""`memplan calibrate [PROFILES...]`: fit the device overheads (CUDA context, workspaces outside the allocator, the
caching allocator's reserved-vs-allocated line) from measured GPU profiles and write a calibration file that
`memplan estimate` then uses (docs/calibration.md)."""
from __future__ import annotations

GIB = 2**30
MIB = 2**20


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="fit device overheads from measured GPU profiles (docs/calibration.md)",
                       description="Fit, from real GPU profiles (memplan profile --device cuda), the CUDA context, "
                                   "workspaces outside the caching allocator, and the allocator's overhead "
                                   "(reserved_peak = slope * allocated_peak + intercept, least squares), and write "
                                   "a memplan.calibration/1 file per GPU. CPU and OOM profiles are not fitted.")
    p.add_argument("profiles", nargs="*", metavar="PROFILES",
                   help="profile files or folders (default: profiles/)")
    p.add_argument("--out", metavar="PATH", help="a folder, or a .json file when the profiles are from one GPU "
                   "(default: $MEMPLAN_CALIBRATIONS or ~/.config/memplan/calibrations)")
    p.add_argument("--json", action="store_true", help="print the calibration document(s) as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from memplan.calibrate import calibrate
    from memplan.outputs import output_dir, output_path

    if args.out:  # a .json file, or a folder (docs/calibration.md)
        (output_path if args.out.endswith(".json") else output_dir)(args.out, "--out")
    written = calibrate(args.profiles, out=args.out)
    if args.json:
        docs = [d for _, d in written]
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=1))
        return 0
    for path, doc in written:
        ov, fit, prov = doc["overheads"], doc["fit"], doc["provenance"]
        a = fit["allocator"]
        print(f"{doc['name']}: {doc['gpu']['name']} · {prov['n_profiles']} profiles"
              + (f" (excluded: {', '.join(f'{v} {k}' for k, v in prov['excluded'].items())})"
                 if prov.get("excluded") else ""))
        print(f"  CUDA context          {ov['cuda_context_bytes'] / MIB:9.1f} MiB  ({fit['cuda_context']['method']})")
        print(f"  outside the allocator {ov['cublas_workspace_bytes'] / MIB:9.1f} MiB  ({fit['workspaces']['method']})")
        print(f"  allocator             reserved = {a['slope']:.4f} × allocated + {a['intercept_bytes'] / MIB:.1f} MiB"
              f"  (n {a['n']}, rms residual {a['rms_residual_bytes'] / MIB:.1f} MiB"
              + (f" = {a['rms_residual_pct']:.2f}% of reserved" if a.get("rms_residual_pct") is not None else "")
              + ")")
        d = fit["device_total"]
        if d.get("n"):
            print(f"  device total (in sample) vs NVML: |error| median {d['median_abs_error_pct']:.2f}%, "
                  f"worst {d['max_abs_error_pct']:.2f}%")
        for note in doc.get("notes") or []:
            print(f"  note: {note}")
        print(f"  wrote {path}")
    return 0
