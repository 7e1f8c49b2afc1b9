"""Allocated vs predicted reserved memory through a training step, for the IBM fms-acceleration A100-80GB rows.

    python scripts/report_allocator.py            # about 4 traces of Mistral-7B: minutes on 2 CPU cores

Each configuration is traced on meta tensors (memplan/trace), its allocation stream replayed through the model of
torch 2.13's caching allocator (memplan/allocator) under the default settings and expandable_segments:True.
Writes reports/allocator_replay.csv (requested / allocated / reserved bytes through the step, downsampled),
reports/allocator_replay.png, and reports/allocator_ibm.csv (one row per configuration next to IBM's measurements).

IBM's rows (foundation-model-stack/fms-acceleration, scripts/benchmarks/refs/a100_80gb.csv; A100-80GB, transformers
4.x, flash-attention 2, bf16, LoRA r16 alpha 16 on q/k/v/o, 4096-token samples, one GPU): torch max_memory_allocated
and nvidia-smi's peak, in GiB as the issue quotes them.
"""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
COMMON = dict(seq_len=4096, lora_r=16, lora_alpha=16, lora_targets=QKVO, lora_dropout=0.1, gradient_checkpointing=True,
              attention="sdpa")
ROWS = [  # label, TrainSpec fields, IBM max_memory_allocated GiB, IBM nvidia-smi GiB
    ("QLoRA r16 b4", dict(bits=4, batch_size=4), 19.25, 25.45),
    ("QLoRA r16 b8", dict(bits=4, batch_size=8), 34.46, 44.97),
    ("LoRA r16 b4", dict(bits=16, batch_size=4), 24.87, 28.88),
    ("full FT b4", dict(bits=16, method="full", batch_size=4), 67.46, 75.45),
]
CONFS = {"default": "", "expandable": "expandable_segments:True"}


def main() -> int:
    import importlib.metadata as md

    logging.disable(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memplan.allocator import parse_alloc_conf
    from memplan.allocator.device import device_replay
    from memplan.allocator.report import downsample
    from memplan.catalog import resolve_model
    from memplan.spec import TrainSpec
    from memplan.trace import run_trace

    stack = ";".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes"))
    model = resolve_model("mistral-7b-v0.1")
    out = ROOT / "reports"
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    summary = []
    with open(out / "allocator_replay.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "alloc_conf", "event", "phase", "requested_bytes", "allocated_bytes", "reserved_bytes",
                    "stack"])
        for ax, (label, fields, ibm_alloc, ibm_smi) in zip(axes.flat, ROWS):
            spec = TrainSpec(**{**COMMON, **fields})
            tr = run_trace(model, spec, record_allocations=True, keep_timeline=False)
            row = {"config": label, "ibm_max_allocated_gib": ibm_alloc, "ibm_nvidia_smi_gib": ibm_smi,
                   "trace_peak_gib": round(tr.peak_bytes / GIB, 3), "stack": stack}
            for key, text in CONFS.items():
                d = device_replay(tr.allocations, parse_alloc_conf(text))
                r = d.replay
                pts = downsample(r.timeline, 1500)
                for event, req, alloc, res, phase in pts:
                    w.writerow([label, text or "default", event, phase, req, alloc, res, stack])
                xs = [p[0] for p in pts]
                if key == "default":
                    ax.plot(xs, [p[1] / GIB for p in pts], lw=0.8, color="#888888", label="tensor bytes (trace)")
                    ax.plot(xs, [p[2] / GIB for p in pts], lw=0.8, color="#1f4e79", label="allocated (blocks)")
                ax.plot(xs, [p[3] / GIB for p in pts], lw=1.1, color="#b22222" if key == "default" else "#e69f00",
                        label=f"reserved, {text or 'default settings'}")
                row.update({f"predicted_max_allocated_gib": round(r.peak_allocated_bytes / GIB, 3),
                            f"predicted_reserved_{key}_gib": round(r.peak_reserved_bytes / GIB, 3),
                            f"fragmentation_{key}_gib": round(r.fragmentation_bytes / GIB, 3),
                            f"device_total_{key}_gib": round(d.device_total_bytes / GIB, 3)})
            ax.axhline(ibm_alloc, color="#1f4e79", ls=":", lw=0.8, label=f"IBM max_memory_allocated {ibm_alloc}")
            ax.axhline(ibm_smi, color="#b22222", ls=":", lw=0.8, label=f"IBM nvidia-smi peak {ibm_smi}")
            ax.set_title(f"Mistral-7B {label}, seq 4096 (memplan trace + allocator replay)", fontsize=9)
            ax.set_xlabel("allocation event (two steps)", fontsize=8)
            ax.set_ylabel("GiB (2^30 bytes)", fontsize=8)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=6, loc="lower right")
            summary.append(row)
            print(row, flush=True)
            del tr
    fig.suptitle(f"predicted reserved vs allocated through the step; {stack}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "allocator_replay.png", dpi=110)
    with open(out / "allocator_ibm.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    print(f"wrote {out / 'allocator_replay.csv'}, {out / 'allocator_replay.png'}, {out / 'allocator_ibm.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
