"""Per-phase measurement: what each phase of a real run used, on CUDA or on the CPU.

CUDA  torch.cuda.max_memory_allocated / max_memory_reserved, reset at the start of each phase (so each phase's
      figure is its own peak, which includes whatever earlier phases left alive), and NVML "used" memory of the
      device sampled by a background thread (its peak per phase). NVML sees everything on the device: the CUDA
      context, cuBLAS workspaces, bitsandbytes' buffers and the caching allocator's reserved segments.
CPU   the live tensor bytes counted by memplan.trace.tracker.LiveBytesTracker (the trace's own counter; its
      phase_peaks), and the process's resident set size sampled by a background thread (peak per phase; the
      lifetime peak from getrusage too). RSS includes the Python interpreter, the libraries and the allocator's
      free lists, so it is always above the tensor bytes.
"""
from __future__ import annotations

import re
import resource
import threading
import time

_UNITS = {"B": 1, "bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_TRIED = re.compile(r"Tried to allocate\s+([0-9.]+)\s*(B|bytes|KiB|MiB|GiB|TiB|KB|MB|GB|TB)")


def parse_oom_bytes(message: str) -> int | None:
    """The bytes an out-of-memory error asked for: torch's "Tried to allocate 1.95 GiB" (None if absent).
    torch prints 2 decimals, so the figure is exact to 0.005 of its unit."""
    m = _TRIED.search(message or "")
    if not m:
        return None
    return int(round(float(m.group(1)) * _UNITS[m.group(2)]))


def is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc)
    # bitsandbytes' own kernels and cuBLAS report an OOM as a plain RuntimeError
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def rss_bytes() -> int:
    """Resident set size of this process now (from /proc; psutil if /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def max_rss_bytes() -> int:
    """The process's lifetime peak RSS (getrusage ru_maxrss, KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Sampler(threading.Thread):
    """Samples `read()` every `interval` seconds in the background; keeps the peak per phase.

    The main thread sets `.phase`; a sample is attributed to the phase current when it was taken. Reading
    `peaks` right after a phase changes may miss a spike shorter than `interval` (NVML itself refreshes its
    counter about every few ms): the sampled peak is a lower bound of the true peak."""

    def __init__(self, read, interval: float = 0.005):
        super().__init__(daemon=True, name="memplan-sampler")
        self.read = read
        self.interval = interval
        self.phase = "load"
        self.peaks: dict[str, int] = {}
        self.samples = 0
        self.error: str | None = None
        self._halt = threading.Event()

    def set_phase(self, phase: str) -> None:
        self.sample()  # close the old phase with a fresh reading
        self.phase = phase
        self.sample()

    def sample(self) -> None:
        try:
            value = int(self.read())
        except Exception as e:  # a sampler must never kill the run
            self.error = f"{e.__class__.__name__}: {e}"
            return
        self.samples += 1
        if value > self.peaks.get(self.phase, -1):
            self.peaks[self.phase] = value

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=2)
        self.sample()


class NVML:
    """Used memory of one device, read through NVML (nvidia-ml-py)."""

    def __init__(self, uuid: str | None = None, index: int = 0):
        import pynvml

        self._n = pynvml
        pynvml.nvmlInit()
        handle = None
        if uuid:
            want = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                got = pynvml.nvmlDeviceGetUUID(h)
                got = got.decode() if isinstance(got, bytes) else got
                if got == want:
                    handle = h
                    break
        self.handle = handle or pynvml.nvmlDeviceGetHandleByIndex(index)

    def used(self) -> int:
        return int(self._n.nvmlDeviceGetMemoryInfo(self.handle).used)

    def total(self) -> int:
        return int(self._n.nvmlDeviceGetMemoryInfo(self.handle).total)

    def close(self) -> None:
        try:
            self._n.nvmlShutdown()
        except Exception:
            pass


class PhaseClock:
    """Wall-clock seconds per phase (CUDA synchronized at each boundary by the caller)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._phase = None
        self._t = None

    def enter(self, phase: str | None) -> None:
        now = time.perf_counter()
        if self._phase is not None:
            self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._t
        self._phase, self._t = phase, now
