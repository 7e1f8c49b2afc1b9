"""One flat row per estimated configuration: the CSV schema shared by `estimate --csv` and `sweep`.

The columns are stable and documented here (docs/csv.md is generated from COLUMNS); units are in the names:
`_bytes` columns are bytes, `_gib` columns are GiB (2^30 bytes).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from memplan import __version__
from memplan.estimate import COMPONENTS, PHASES, Estimate
from memplan.spec import TRAIN_FIELDS
from memplan.stack import PACKAGES

GIB = 2**30

# Columns are only ever appended: training settings added after modules_to_save (multi-GPU, #13, and later
# issues' fields) go at the end, after the per-rank columns.
_MULTI_GPU_TRAIN = ("gpus", "parallel", "fsdp_version", "offload", "quant_storage")
_FIRST_TRAIN = tuple(f for f in TRAIN_FIELDS if f not in _MULTI_GPU_TRAIN)
_LATER_TRAIN = tuple(f for f in TRAIN_FIELDS if f in _MULTI_GPU_TRAIN)

COLUMNS: list[tuple[str, str]] = (
    [("memplan_version", "memplan version that computed the row"),
     ("calibration", "which device-overhead figures were used (defaults or a calibration file)"),
     ("model", "catalog name, or the config path / hub id given"),
     ("params_total", "parameters of the base model (count)"),
     ("params_trainable", "trainable parameters: adapters and modules_to_save, or all for full fine-tuning")]
    + [(f, "training setting (see `memplan estimate --help`)") for f in _FIRST_TRAIN]
    + [(f"{c}_bytes", f"tensor bytes of {c} at the peak") for c in COMPONENTS if c != "comm_buffers"]
    + [(f"{p}_bytes", f"tensor peak of the {p} phase, bytes") for p in PHASES]
    + [("peak_phase", "phase that sets the tensor peak"),
       ("peak_bytes", "tensor peak, bytes (compare with torch.cuda.max_memory_allocated)"),
       ("peak_gib", "tensor peak, GiB"),
       ("device_total_bytes", "tensor peak + CUDA context + cuBLAS workspace + allocator overhead, bytes (compare with nvidia-smi)"),
       ("device_total_gib", "device total, GiB")]
    + [(f"{p}_version", f"{p} version the row describes (installed, else the latest supported; --transformers "
        "overrides transformers)") for p in PACKAGES]
    + [("per_rank", "1 when the figures above are one GPU's of a multi-GPU run (rank 0's, the largest rank)"),
       ("strategy", "the data parallelism that runs: none, ddp, fsdp, fsdp-grad-op, zero1, zero2, zero3"),
       ("quant_storage_dtype", "bnb_4bit_quant_storage that runs (auto resolved)"),
       ("comm_buffers_bytes", "tensor bytes of comm_buffers at the peak: unsharded parameters / reduce-scatter input / DDP buckets at the peak, bytes"),
       ("nccl_buffers_bytes", "NCCL communicator buffers per GPU (device overhead, in device_total), bytes"),
       ("comm_bytes_per_step", "bytes each GPU sends per step in ring collectives"),
       ("host_bytes_per_node", "host RAM for offloaded state per node, bytes")]
    + [(f, "training setting (see `memplan estimate --help`)") for f in _LATER_TRAIN]
)
COLUMN_NAMES = [name for name, _ in COLUMNS]


def row(est: Estimate) -> dict:
    out = {"memplan_version": __version__, "calibration": est.overhead_source, "model": est.model,
           "params_total": est.params_total, "params_trainable": est.params_trainable}
    for k, v in est.config.items():
        out[k] = "+".join(v) if isinstance(v, list) else v
    out.update({f"{c}_bytes": est.components.get(c, 0) for c in COMPONENTS if c != "comm_buffers"})
    p = est.parallel
    out.update(per_rank=int(bool(p)), strategy=p.get("strategy", "none"),
               quant_storage_dtype=p.get("quant_storage", "uint8" if est.config.get("bits") == 4 else ""),
               comm_buffers_bytes=est.components.get("comm_buffers", 0),
               nccl_buffers_bytes=est.device_overheads.get("nccl_buffers", 0),
               comm_bytes_per_step=p.get("comm_bytes_per_step", 0), host_bytes_per_node=est.host_bytes)
    out.update({f"{p}_bytes": est.phases[p] for p in PHASES})
    out.update(peak_phase=est.peak_phase, peak_bytes=est.peak_bytes, peak_gib=round(est.peak_bytes / GIB, 3),
               device_total_bytes=est.device_total_bytes, device_total_gib=round(est.device_total_bytes / GIB, 3))
    out.update({f"{p}_version": est.stack.get(p) for p in PACKAGES})
    return out


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] = COLUMN_NAMES) -> None:
    """Write atomically (a temporary file renamed into place): an interrupted run leaves no partial CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def columns_markdown() -> str:
    return "\n".join(["| column | meaning |", "|---|---|"] + [f"| `{n}` | {d} |" for n, d in COLUMNS])
