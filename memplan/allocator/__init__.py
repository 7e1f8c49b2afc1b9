"""A model of PyTorch's CUDA caching allocator, and the replay of a step's allocations through it.

    from memplan.allocator import parse_alloc_conf, replay
    result = replay(stream, parse_alloc_conf("expandable_segments:True"))   # ReplayResult
    result.peak_reserved_bytes                                              # predicted max_memory_reserved

Pure Python (no torch): config.py (constants, PYTORCH_CUDA_ALLOC_CONF), model.py (the allocator), replay.py (a
stream of allocations and frees -> reserved memory), snapshot.py (a real torch.cuda.memory._snapshot() as a stream).
"""
from __future__ import annotations

from memplan.allocator.config import AllocatorConfig, parse_alloc_conf
from memplan.allocator.model import AllocatorOutOfMemory, CachingAllocator
from memplan.allocator.replay import ALLOC, FREE, ReplayResult, replay

__all__ = ["ALLOC", "FREE", "AllocatorConfig", "AllocatorOutOfMemory", "CachingAllocator", "ReplayResult",
           "parse_alloc_conf", "replay"]
