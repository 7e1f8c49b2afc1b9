"""One rank of a multi-GPU profile: `accelerate launch -m memplan.profile.rank JOB.json` starts N of these
(memplan.profile.multi is the launcher and says what accelerate launch does). Each runs the single-process
profile's run (memplan.profile.runner.run_job) with Rank's hooks: accelerate's Accelerator (the process group),
its prepare (the wrapping) and the step; it writes its record to the job's output_dir/rank{RANK}.json.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


class Rank:
    """One rank's part of memplan.profile.runner._measure: accelerate's Accelerator (the process group), its
    prepare (the wrapping), the step."""

    def __init__(self, job: dict, train):
        d = job["dist"]
        self.rank, self.world_size, self.local_rank = int(d["rank"]), int(d["world_size"]), int(d["local_rank"])
        self.backend = d["backend"]
        self.train = train
        self.device = job["device"]
        self.accelerator = None
        self.engine = None

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.local_rank}" if self.device == "cuda" else "cpu"

    def init(self) -> None:
        """Accelerator() from the environment accelerate launch set: it initializes the process group (NCCL on
        CUDA, gloo on the CPU) and reads its FSDP / DeepSpeed plugin from the environment."""
        from accelerate import Accelerator

        self.accelerator = acc = Accelerator(cpu=self.device == "cpu")
        if self.device == "cpu" and self.train.strategy.startswith("fsdp"):
            _fsdp_on_cpu(acc)
        kind = acc.distributed_type.name
        expected = {"fsdp": "FSDP", "fsdp-grad-op": "FSDP", "ddp": "MULTI_CPU" if self.device == "cpu" else
                    "MULTI_GPU"}.get(self.train.strategy, "DEEPSPEED")
        if kind != expected or acc.num_processes != self.world_size:
            raise RuntimeError(f"accelerate set up {kind} over {acc.num_processes} process(es), not {expected} over "
                               f"{self.world_size}: is the environment accelerate launch's?")

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    def prepare(self, model, optimizer, tracker):
        """accelerator.prepare(model, optimizer), as users' scripts call it: FSDP2 (fsdp2_prepare_model, the
        optimizer switched to the sharded parameters), DDP, or DeepSpeed's engine (the model returned is the
        engine)."""
        acc = self.accelerator
        if self.train.strategy.startswith("zero"):
            # no dataloader goes through prepare: the micro-batch as accelerate's error message asks for it
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.train.batch_size
            model, optimizer = acc.prepare(model, optimizer)
            self.engine = model
            return model, optimizer
        if self.train.strategy == "ddp" and tracker is not None:
            # its Reducer allocates the gradient buckets here: counted, as the rank trace counts them
            tracker.default_category = "comm_buffers"
            try:
                with tracker:
                    return acc.prepare(model, optimizer)
            finally:
                tracker.default_category = "temporaries"
        return acc.prepare(model, optimizer)

    def train_step(self, model, optimizer, input_ids, on_phase, step_context, train, fused_loss):
        """One step: the recipe's step, or DeepSpeed's: accelerator.backward(loss) runs engine.backward then
        engine.step (accelerate utils/deepspeed.py DeepSpeedEngineWrapper.backward); called here as those two, so
        that the optimizer's step is measured as its own phase."""
        from memplan import recipe

        if self.engine is None:
            return recipe.train_step(model, optimizer, input_ids, on_phase, step_context, train, fused_loss)
        engine = self.engine
        on_phase("forward")
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        on_phase("backward")
        engine.set_gradient_accumulation_boundary(is_boundary=True)
        engine.backward(loss)
        value = loss.detach()
        del loss
        on_phase("optimizer")
        engine.step()
        return value

    def step_context(self, tracker):
        """FSDP2 resizes its buffers' storages in place (no ATen op sees it): the rank trace's bookkeeping of
        those resizes, so that the CPU tracker counts them as the trace does."""
        if tracker is not None and self.train.strategy.startswith("fsdp"):
            from memplan.trace.distributed import _comm_labels

            return _comm_labels(tracker)
        return contextlib.nullcontext()


def _fsdp_on_cpu(accelerator) -> None:
    """accelerate 1.15 turns FSDP on only for accelerator devices: AcceleratorState.__init__ sets distributed_type
    FSDP and the plugin in its MULTI_GPU / MULTI_XPU / ... branch, and Accelerator(cpu=True) is MULTI_CPU, whose
    prepare wraps DDP. On the CPU the rank therefore sets those two itself, with the plugin accelerate built from
    the environment (FSDP_* variables from the config file); accelerator.prepare then runs accelerate's own FSDP2
    path (_prepare_fsdp2, fsdp2_prepare_model) on gloo, as on GPUs."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    # the plugin from the FSDP_* environment accelerate launch set (Accelerator() built one and dropped it)
    accelerator.state.fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP


def worker_main(argv: list[str] | None = None) -> int:
    """One rank: `python -m memplan.profile.rank JOB.json` as accelerate launch starts it (torchrun's RANK,
    LOCAL_RANK, WORLD_SIZE in the environment); writes its record to the job's output_dir/rank{RANK}.json."""
    from memplan.profile.child import run_file
    from memplan.profile.runner import emit, set_emit_rank

    env = os.environ
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", env.get("RANK", "0")))

    def fill(job: dict) -> dict:
        d = job["dist"]
        world = int(env.get("WORLD_SIZE", d["world_size"]))
        job["dist"] = {**d, "rank": rank, "local_rank": local_rank, "world_size": world}
        job["output"] = str(Path(d["output_dir"]) / f"rank{rank}.json")
        return job

    set_emit_rank(rank)
    emit("rank_started", pid=os.getpid())
    return run_file(sys.argv[1:] if argv is None else argv, fill)


if __name__ == "__main__":
    sys.exit(worker_main())
