"""The caching allocator's constants and its PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF string.

Follows torch 2.13 (git cf30153c, the version memplan's stack pins): the constants are
c10/core/AllocatorConfig.h (installed with torch: torch/include/c10/core/AllocatorConfig.h), the parser is
c10/core/AllocatorConfig.cpp AcceleratorAllocatorConfig::parseArgs (common keys) plus
c10/cuda/CUDAAllocatorConfig.h getKeys() (CUDA keys, accepted; the ones that change device memory are modelled).
torch 2.5-2.7 differ only in that large_segment_size_mb did not exist (20 MiB fixed) and unknown keys were skipped
silently; the block rules below are the same in every version since 2.1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from memplan.errors import MemplanError

MB = 1 << 20
K_MIN_BLOCK_SIZE = 512  # kMinBlockSize: all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1 << 20  # kSmallSize: largest "small" allocation is 1 MiB
K_SMALL_BUFFER = 2 << 20  # kSmallBuffer: "small" allocations are packed in 2 MiB blocks
K_MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc: allocations between 1 and 10 MiB may use the large segment size
K_ROUND_LARGE = 2 << 20  # kRoundLarge: round up large allocations to 2 MiB
K_LARGE_BUFFER = 20 << 20  # kLargeBuffer / large_segment_size_ default: "large" allocations packed in 20 MiB
UNLIMITED = (1 << 64) - 1  # std::numeric_limits<size_t>::max(): max_split_size_ default (every block may split)
_ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MiB .. 64 GiB, one slot per power of two

# AcceleratorAllocatorConfig::parseArgs keys, then CUDAAllocatorConfig::getKeys() (accepted, not modelled: they
# change locking, pinned host memory or graph capture, not device memory of an eager training step).
_COMMON_KEYS = {"large_segment_size_mb", "max_split_size_mb", "max_non_split_rounding_mb",
                "garbage_collection_threshold", "roundup_power2_divisions", "expandable_segments",
                "pinned_use_background_threads"}
_CUDA_KEYS = {"backend", "release_lock_on_cudamalloc", "pinned_use_cuda_host_register", "release_lock_on_hipmalloc",
              "pinned_use_hip_host_register", "graph_capture_record_stream_reuse", "pinned_reserve_segment_size_mb",
              "pinned_num_register_threads", "per_process_memory_fraction", "pinned_free_catch_all",
              "throw_on_cudamalloc_oom"}


@dataclass(frozen=True)
class AllocatorConfig:
    """The settings that decide device memory. Defaults are torch's (no PYTORCH_CUDA_ALLOC_CONF)."""

    large_segment_size: int = K_LARGE_BUFFER
    max_split_size: int = UNLIMITED
    max_non_split_rounding_size: int = K_LARGE_BUFFER
    garbage_collection_threshold: float = 0.0
    roundup_power2_divisions: tuple = (0,) * _ROUNDUP_INTERVALS
    expandable_segments: bool = False
    per_process_memory_fraction: float | None = None  # None: torch.cuda.set_per_process_memory_fraction not used
    text: str = field(default="", compare=False)

    def divisions_for(self, size: int) -> int:
        """AcceleratorAllocatorConfig::roundup_power2_divisions(size): the slot of floor(log2(size)) from 1 MiB."""
        log_size = size.bit_length() - 1
        index = max(0, log_size - 20)  # interval_start = log2(1 MiB) = 20
        return self.roundup_power2_divisions[min(index, _ROUNDUP_INTERVALS - 1)]

    def describe(self) -> str:
        return self.text or "defaults (no PYTORCH_CUDA_ALLOC_CONF)"


def _tokenize(text: str) -> list[str]:
    """ConfigTokenizer: ',', ':', '[', ']' are tokens of their own; whitespace is dropped."""
    tokens, buf = [], ""
    for ch in text:
        if ch in ",:[]":
            if buf:
                tokens.append(buf)
                buf = ""
            tokens.append(ch)
        elif not ch.isspace():
            buf += ch
    if buf:
        tokens.append(buf)
    return tokens


def parse_alloc_conf(text: str | None) -> AllocatorConfig:
    """Parse a PYTORCH_CUDA_ALLOC_CONF string the way torch 2.13 does; a string torch rejects is a MemplanError."""
    text = (text or "").strip()
    if not text:
        return AllocatorConfig()
    tok = _tokenize(text)

    def bad(msg: str) -> MemplanError:
        return MemplanError(f"PYTORCH_CUDA_ALLOC_CONF {text!r}: {msg}")

    def at(i: int) -> str:
        if i >= len(tok):
            raise bad("ends too early")
        return tok[i]

    def expect(i: int, token: str) -> None:
        if at(i) != token:
            raise bad(f"expected {token!r} after {tok[i - 1]!r}, got {at(i)!r}")

    def size_t(i: int) -> int:
        try:
            v = int(at(i))
        except ValueError:
            raise bad(f"{tok[i - 2]} needs a whole number, got {at(i)!r}") from None
        if v < 0:
            raise bad(f"{tok[i - 2]} must not be negative")
        return v

    def boolean(i: int) -> bool:
        if at(i) not in ("True", "False"):  # ConfigTokenizer::toBool is case-sensitive
            raise bad(f"expected True or False for {tok[i - 2]}, got {at(i)!r}")
        return at(i) == "True"

    def pow2(v: int) -> bool:
        return v > 0 and v & (v - 1) == 0

    v: dict = {}
    # parseArgs reads large_segment_size_mb first: max_non_split_rounding_mb defaults to it and both minimums use it.
    for i, t in enumerate(tok):
        if t == "large_segment_size_mb":
            expect(i + 1, ":")
            mb = size_t(i + 2)
            if mb <= K_MIN_LARGE_ALLOC // MB:
                raise bad(f"large_segment_size_mb must be > {K_MIN_LARGE_ALLOC // MB} MB")
            v["large_segment_size"] = mb * MB
    large = v.get("large_segment_size", K_LARGE_BUFFER)
    v["max_non_split_rounding_size"] = large
    divisions = [0] * _ROUNDUP_INTERVALS
    i = 0
    while i < len(tok):
        key = tok[i]
        if key in (",", ":", "[", "]"):
            raise bad(f"unexpected {key!r}")
        if key not in _COMMON_KEYS and key not in _CUDA_KEYS:
            raise bad(f"unrecognized key {key!r} (torch 2.13 raises 'Unrecognized key')")
        expect(i + 1, ":")
        i += 2
        if key == "roundup_power2_divisions":
            if at(i) == "[":
                first, last_index = True, 0
                i += 1
                while at(i) != "]":
                    boundary_tok = at(i)
                    expect(i + 1, ":")
                    value = size_t(i + 2)
                    if value != 0 and not pow2(value):
                        raise bad("for roundups, the divisions have to be a power of 2 or 0")
                    if boundary_tok == ">":
                        for j in range(last_index + 1, _ROUNDUP_INTERVALS):
                            divisions[j] = value
                    else:
                        try:
                            boundary = int(boundary_tok)
                        except ValueError:
                            raise bad(f"roundup_power2_divisions interval {boundary_tok!r} is not a number") from None
                        if not pow2(boundary):
                            raise bad("for roundups, the intervals have to be powers of 2")
                        index = min(max(boundary.bit_length() - 1, 0), _ROUNDUP_INTERVALS - 1)
                        if first:
                            for j in range(index):
                                divisions[j] = value
                            first = False
                        divisions[index] = value
                        last_index = index
                    i += 3
                    if at(i) == ",":
                        i += 1
                    elif at(i) != "]":
                        raise bad(f"expected ',' or ']' in roundup_power2_divisions, got {at(i)!r}")
            else:
                value = size_t(i)
                if not pow2(value):
                    raise bad("for roundups, the divisions have to be a power of 2")
                divisions = [value] * _ROUNDUP_INTERVALS
        elif key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            mb = size_t(i)
            if mb < large // MB:
                raise bad(f"{key} too small, must be >= {large // MB}")
            v["max_split_size" if key == "max_split_size_mb" else "max_non_split_rounding_size"] = \
                min(mb, UNLIMITED // MB) * MB
        elif key == "large_segment_size_mb":
            pass  # read above
        elif key == "garbage_collection_threshold":
            try:
                g = float(at(i))
            except ValueError:
                raise bad(f"garbage_collection_threshold needs a number, got {at(i)!r}") from None
            if not 0.0 < g < 1.0:
                raise bad("garbage_collection_threshold is invalid, set it in (0.0, 1.0)")
            v["garbage_collection_threshold"] = g
        elif key == "expandable_segments":
            v["expandable_segments"] = boolean(i)
        elif key == "per_process_memory_fraction":
            try:
                f = float(at(i))
            except ValueError:
                raise bad(f"per_process_memory_fraction needs a number, got {at(i)!r}") from None
            if not 0.0 <= f <= 1.0 or math.isnan(f):
                raise bad("per_process_memory_fraction must be in [0.0, 1.0]")
            v["per_process_memory_fraction"] = f
        elif key == "backend":
            if at(i) not in ("native", "cudaMallocAsync"):
                raise bad(f"unknown allocator backend {at(i)!r} (native | cudaMallocAsync)")
            if at(i) == "cudaMallocAsync":
                raise bad("backend:cudaMallocAsync hands memory to CUDA's own stream-ordered pool, which memplan "
                          "does not model; drop it to model the native caching allocator")
        elif key in ("release_lock_on_cudamalloc", "pinned_use_cuda_host_register", "release_lock_on_hipmalloc",
                     "pinned_use_hip_host_register", "graph_capture_record_stream_reuse", "pinned_free_catch_all",
                     "throw_on_cudamalloc_oom", "pinned_use_background_threads"):
            boolean(i)
        else:  # numeric pinned-memory options: host memory, no effect on the device replay
            size_t(i)
        i += 1
        if i < len(tok):
            expect(i, ",")
            i += 1
            if i >= len(tok):
                raise bad("ends with ','")
    return AllocatorConfig(roundup_power2_divisions=tuple(divisions), text=text, **v)
