"""From a trace's allocation stream to the device: replayed reserved memory plus what lives outside the allocator.

    device total = replayed max_memory_reserved + CUDA context

The cuBLAS workspace is not added on top: PyTorch takes it from the caching allocator
(aten/src/ATen/cuda/CublasHandlePool.cpp, getNewWorkspace: CUDACachingAllocator::get()->allocate(
getChosenWorkspaceSize())) the first time a matmul runs and keeps it for the handle's life, so the replay allocates
it at the first forward event and never frees it. NCCL buffers (multi-GPU) sit outside the allocator too and are
added by the multi-GPU view, not here.
"""
from __future__ import annotations

from dataclasses import dataclass

from memplan.allocator.config import AllocatorConfig
from memplan.allocator.replay import ALLOC, ReplayResult, replay

WORKSPACE_HANDLE = "cublas_workspace"


def with_workspace(allocations: list, workspace_bytes: int) -> list:
    """The stream with the cuBLAS workspace allocated where the first forward event is (the first matmul)."""
    if workspace_bytes <= 0:
        return list(allocations)
    at = next((i for i, ev in enumerate(allocations) if ev[4] == "forward"), len(allocations))
    event = (ALLOC, WORKSPACE_HANDLE, workspace_bytes, 0, "forward", "cuBLAS workspace")
    return [*allocations[:at], event, *allocations[at:]]


@dataclass
class DeviceReplay:
    replay: ReplayResult
    cuda_context_bytes: int
    cublas_workspace_bytes: int  # inside the replay (allocated through the caching allocator)
    gpu_bytes: int | None  # the budget: the GPU's memory
    overhead_source: str

    @property
    def device_total_bytes(self) -> int:
        return self.replay.peak_reserved_bytes + self.cuda_context_bytes

    def to_dict(self) -> dict:
        return {**self.replay.to_dict(), "cuda_context_bytes": self.cuda_context_bytes,
                "cublas_workspace_bytes": self.cublas_workspace_bytes, "budget_bytes": self.gpu_bytes,
                "device_total_bytes": self.device_total_bytes, "overhead_source": self.overhead_source}


def device_replay(allocations: list, config: AllocatorConfig, *, gpu_bytes: int | None = None,
                  overheads=None, keep_timeline: bool = True) -> DeviceReplay:
    """Replay a trace's stream on a GPU of `gpu_bytes` (None: unlimited). The allocator may reserve what the CUDA
    context leaves; an allocation that does not fit after the allocator emptied its cache is the OOM point."""
    from memplan.estimate.overhead import default_overheads

    ov = overheads or default_overheads()
    capacity = None if gpu_bytes is None else max(0, gpu_bytes - ov.cuda_context)
    result = replay(with_workspace(allocations, ov.cublas_workspace), config, capacity=capacity,
                    device_total=gpu_bytes, keep_timeline=keep_timeline)
    return DeviceReplay(result, ov.cuda_context, ov.cublas_workspace, gpu_bytes, ov.source)
