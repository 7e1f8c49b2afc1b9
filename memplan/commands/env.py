"""`memplan env`: the GPU(s) this machine has, their memory, the driver and library versions, and the catalog GPU
each one is (by name and memory). Uses NVML only: no CUDA context is created, torch is not imported."""
from __future__ import annotations

import json

GiB = 2**30


def register(subparsers) -> None:
    p = subparsers.add_parser("env", help="detected GPUs, driver and library versions, the matching catalog GPU",
                              description="Detected GPU(s) (NVML), total and free memory, driver, CUDA and "
                                          "library versions, and the catalog GPU each matches. Sizes are GiB "
                                          "(2^30 bytes).")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from memplan.profile.env import detect_gpus, match_catalog, versions

    gpus, driver, why = detect_gpus()
    for g in gpus:
        cat, how = match_catalog(g["name"], g["total_bytes"])
        g["catalog"] = cat.name if cat else None
        g["catalog_match"] = how
    info = {"gpus": gpus, "driver": driver, "no_gpu_reason": why, "versions": versions()}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    if not gpus:
        print(f"No GPU detected: {why}.")
        print("memplan estimate/trace work without one; memplan profile --device cpu measures on the CPU.")
    else:
        print(f"NVIDIA driver {driver}" + (f", CUDA {gpus[0].get('cuda_driver')} (driver API)"
                                           if gpus[0].get("cuda_driver") else ""))
        for g in gpus:
            cat = (f"catalog: {g['catalog']} (matched by {g['catalog_match']})" if g["catalog"]
                   else "catalog: no match (add it to memplan/catalog/gpus.json)")
            print(f"GPU {g['index']}: {g['name']}  {g['total_bytes'] / GiB:.2f} GiB total, "
                  f"{g['free_bytes'] / GiB:.2f} GiB free"
                  + (f", compute capability {g['compute_capability']}" if g.get("compute_capability") else "")
                  + f"  — {cat}")
    v = info["versions"]
    print("versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]) +
          ("; missing: " + ", ".join(k for k in v if not v[k]) if any(not v[k] for k in v) else ""))
    return 0
