"""The environment a profile was measured in: GPUs (NVML, else torch), driver, CUDA, library versions.
No host names, no user names, no paths outside the project.

`detect_gpus()` uses NVML only (pynvml from nvidia-ml-py), so `memplan env` answers without creating a CUDA
context; `environment()` adds torch's view (CUDA runtime version, device properties) when torch is importable.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "nvidia-ml-py")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    from memplan import __version__

    out["memplan"] = __version__
    return out


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def detect_gpus() -> tuple[list[dict], str | None, str | None]:
    """(gpus, driver version, why none) from NVML. Each GPU: index, name, uuid, total/free/used bytes."""
    try:
        import pynvml
    except ImportError:
        return [], None, "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return [], None, f"no NVIDIA driver found ({e.__class__.__name__}: {e})"
    try:
        driver = _s(pynvml.nvmlSystemGetDriverVersion())
        try:
            cuda_driver = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            cuda_driver = f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}"
        except Exception:
            cuda_driver = None
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpu = {"index": i, "name": _s(pynvml.nvmlDeviceGetName(h)), "uuid": _s(pynvml.nvmlDeviceGetUUID(h)),
                   "total_bytes": int(mem.total), "free_bytes": int(mem.free), "used_bytes": int(mem.used),
                   "cuda_driver": cuda_driver}
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                gpu["compute_capability"] = f"{major}.{minor}"
            except Exception:
                pass
            gpus.append(gpu)
        return gpus, driver, None if gpus else "the NVIDIA driver reports no GPU"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def match_catalog(name: str, total_bytes: int):
    """The catalog GPU (memplan.catalog.gpus.json) a detected GPU is: by name, then by memory size."""
    from memplan.catalog import gpu_list

    key = name.lower().replace("nvidia", "").replace("geforce", "").strip()
    best, best_score = None, None
    for gpu in gpu_list():
        cat = gpu.name.lower().replace("nvidia", "").replace("geforce", "").strip()
        # memory-size words ("80gb") are checked by memory, not by name: NVML names vary ("A100-SXM4-80GB")
        words = [w for w in cat.replace("-", " ").split() if w and not re.fullmatch(r"\d+gb", w)]
        if not words or not all(w in key.replace("-", " ").split() for w in words):
            continue
        diff = abs(gpu.memory_bytes - total_bytes) / max(total_bytes, 1)
        score = (diff > 0.08, -len(words), diff)  # memory within 8%, most specific name, closest memory
        if best_score is None or score < best_score:
            best, best_score = gpu, score
    if best is not None and best_score[0]:  # name matched but memory did not: a different variant
        return best, "name only (memory differs)"
    return best, "name and memory" if best else None


def environment(device: str = "cpu") -> dict:
    """Everything a profile records about where it ran."""
    env = {"versions": versions(), "platform": {"system": platform.system(), "machine": platform.machine(),
                                                "python_implementation": platform.python_implementation()},
           "cpu_count": os.cpu_count()}
    try:
        import psutil

        env["ram_bytes"] = int(psutil.virtual_memory().total)
    except ImportError:
        pass
    gpus, driver, why = detect_gpus()
    env["driver"] = driver
    env["gpus"] = gpus
    if why:
        env["gpu_note"] = why
    if "torch" in sys.modules or device == "cuda":
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["torch_cuda_available"] = bool(torch.cuda.is_available())
        if device == "cuda" and torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["device"] = {"name": p.name, "total_bytes": int(p.total_memory),
                             "capability": f"{p.major}.{p.minor}",
                             "multiprocessors": p.multi_processor_count,
                             "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
            for g in env["gpus"]:  # keep only the GPU used first in the list
                if str(getattr(p, "uuid", "")) and str(p.uuid) in g.get("uuid", ""):
                    env["gpus"] = [g] + [x for x in env["gpus"] if x is not g]
                    break
    for g in env["gpus"]:
        cat, how = match_catalog(g["name"], g["total_bytes"])
        g["catalog"] = cat.name if cat else None
        g["catalog_match"] = how
    return env
