"""One rank's training step under data parallelism, on a fake process group in this one process.

torch.distributed runs with the "fake" backend (torch.testing._internal.distributed.fake_pg.FakeStore): every
collective returns at once without moving data, so one process plays rank 0 of an N-rank job and its tensors are
exactly that rank's tensors — sharded parameters, unsharded buffers in flight, gradients, optimizer states,
activations of its own micro-batch. The values are garbage (nothing is gathered), the bytes are not: memory does
not depend on values (DESIGN.md).

What runs, the way `accelerate launch` wraps models (memplan profile --gpus N runs the same, memplan.profile.multi):
- fsdp / fsdp-grad-op (FSDP2): accelerate 1.15's own fsdp2_prepare_model (utils/fsdp_utils.py) with the
  FullyShardedDataParallelPlugin of the profile's config file (TRANSFORMER_BASED_WRAP on the decoder layer class,
  mixed_precision 'no'): `fully_shard` on every decoder layer, on the input embeddings (untied), on the tail
  [final norm, lm_head] (tied: [embeddings, lm_head]) with reshard_after_forward=False, then on the root.
  Under PEFT accelerate finds no final norm (its _find_final_norm looks among the children of the PeftModel's
  `base_model_prefix` attribute, which PEFT resolves to the CausalLM, whose children are the decoder stack and
  lm_head): the norm's weight then belongs to the root's unit, which stays unsharded from the root's forward to
  the end of its backward. fsdp reshards each layer after its forward (FULL_SHARD); fsdp-grad-op keeps it
  unsharded until its backward (SHARD_GRAD_OP). bitsandbytes 4-bit weights stored as uint8 are left out of
  sharding (accelerate's ignored_params), so each rank keeps them whole.
- ddp: torch DistributedDataParallel with its defaults (bucket_cap_mb=25, gradient_as_bucket_view=False): its
  Reducer allocates one flat bucket buffer per bucket when it is built.
Not traced: FSDP1 (the FlatParameter path needs a device with streams) and DeepSpeed ZeRO (its engine needs an
accelerator and a launcher): those are checked against DeepSpeed's own estimators and the published figures.

Every byte counted as in memplan.trace.runner; FSDP2's buffers that it frees and re-allocates by resizing their
storage (alloc_storage / free_storage, which no ATen op sees) are re-read after each resize, and everything FSDP
allocates for its collectives is labeled comm_buffers. Only real CPU tensors: the meta path (any size) is not
done (see docs/trace.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
import warnings

from memplan.errors import MemplanError
from memplan.spec import ModelSpec, TrainSpec

TRACED = ("none", "ddp", "fsdp", "fsdp-grad-op")


def traceable(train: TrainSpec) -> str | None:
    """Why this configuration cannot be traced on a fake process group (None when it can)."""
    s = train.strategy
    if s.startswith("zero"):
        return (f"{s}: DeepSpeed's engine needs an accelerator and its launcher; checked against DeepSpeed's "
                "estimators instead (tests/test_parallel.py)")
    if s.startswith("fsdp") and train.fsdp_version == 1:
        return "FSDP1 is not traced (its FlatParameter path asks the device for streams); FSDP2 is"
    if train.offload != "none":
        return "CPU offload is not traced (host copies are outside the GPU's tensor bytes)"
    if s != "none" and train.bits == 8:
        return "8-bit weights under data parallelism are not traced"
    if s == "ddp" and train.activation_offload == "all":
        return "DDP with TRL's OffloadActivations is not traced (the reducer's hooks fire inside its context)"
    return None


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _labeled(tracker, fn):
    """fn, with what it allocates labeled comm_buffers."""
    def run(*args, **kwargs):
        before = tracker.default_category
        tracker.default_category = "comm_buffers"
        try:
            return fn(*args, **kwargs)
        finally:
            tracker.default_category = before
    return run


@contextlib.contextmanager
def _comm_labels(tracker):
    """Count FSDP2's storage resizes and label what its collectives allocate as comm_buffers."""
    import torch.distributed.fsdp._fully_shard._fsdp_param as fp
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as fpg

    saved = (fp.alloc_storage, fp.free_storage, fpg.alloc_storage)
    methods = [(fpg.FSDPParamGroup, name) for name in ("unshard", "wait_for_unshard", "post_backward")]
    saved_methods = [getattr(cls, name) for cls, name in methods]

    def resized(fn, tensor):
        # A snapshot of the peak shares record objects: give the resized storage a fresh record, so the
        # snapshot keeps the size it had at the peak.
        if tracker._peak_dirty:
            tracker._take_snapshot()
        key = tensor.untyped_storage()._cdata
        rec = tracker._live.get(key)
        if rec is not None:
            tracker._live[key] = dataclasses.replace(rec, category="comm_buffers")
        fn(tensor)
        tracker._record(tensor)
        rec = tracker.record_of(tensor)
        if rec is not None:
            rec.category = "comm_buffers"

    def alloc(tensor):
        resized(saved[0], tensor)

    def free(tensor):
        resized(saved[1], tensor)

    fp.alloc_storage = fpg.alloc_storage = alloc
    fp.free_storage = free
    for (cls, name), fn in zip(methods, saved_methods):
        setattr(cls, name, _labeled(tracker, fn))
    try:
        yield
    finally:
        fp.alloc_storage, fp.free_storage, fpg.alloc_storage = saved
        for (cls, name), fn in zip(methods, saved_methods):
            setattr(cls, name, fn)


@contextlib.contextmanager
def _ddp_on_meta(enabled: bool):
    """DDP's constructor compares parameter shapes across ranks by reading a count (.item()): not on meta, and
    pointless on a fake process group where every rank is this one."""
    import torch.nn.parallel.distributed as ddp

    saved = ddp._verify_param_shape_across_processes
    if enabled:
        ddp._verify_param_shape_across_processes = lambda *a, **k: None
    try:
        yield
    finally:
        ddp._verify_param_shape_across_processes = saved


class _NoRebuild:
    """The Reducer, but for its bucket rebuild after the first step, which syncs bucket indices from rank 0 by
    reading values (not on meta). The rebuilt buckets hold the same bytes in another order; only the brief
    overlap of old and new buckets at the start of step 2's forward is not seen on meta."""

    def __init__(self, reducer):
        self._reducer = reducer

    def _rebuild_buckets(self):
        return False

    def __getattr__(self, name):
        return getattr(self._reducer, name)


def _bucket_in_place(state, bucket):
    import torch

    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


@contextlib.contextmanager
def fsdp2_on_meta(model):
    """Let FSDP2 run on meta parameters (any model size): skip its no-meta check, allocate what its collectives
    allocate (all-gather output, reduce-scatter input, unsharded parameters) on meta instead of the mesh's CPU
    device, and give meta the CPU's (no-op) stream handle. Byte-equal to the real CPU run on small models
    (tests/test_parallel.py)."""
    import torch
    import torch.distributed.fsdp._fully_shard._fsdp_collectives as fc
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as fpg
    from torch.distributed.fsdp import FSDPModule

    meta = torch.device("meta")
    saved_handle = (fc._get_device_handle, fpg._get_device_handle)
    saved_fns = (fpg.foreach_all_gather, fpg.foreach_reduce)
    saved_validate = fpg.FSDPParamGroup._validate_no_meta_params

    def handle(kind):
        return saved_handle[0]("cpu" if kind == "meta" else kind)

    def on_meta(fn):
        def run(*args, **kwargs):
            args = [meta if isinstance(a, torch.device) else a for a in args]
            kwargs = {k: meta if isinstance(v, torch.device) else v for k, v in kwargs.items()}
            return fn(*args, **kwargs)
        return run

    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None:
                group.device = meta  # one rank (N = 1) copies into outputs on the group's device
            for fsdp_param in group.fsdp_params if group else ():
                fsdp_param.device = meta
    fc._get_device_handle = fpg._get_device_handle = handle
    fpg.foreach_all_gather, fpg.foreach_reduce = on_meta(saved_fns[0]), on_meta(saved_fns[1])
    fpg.FSDPParamGroup._validate_no_meta_params = lambda self: None
    try:
        yield
    finally:
        fc._get_device_handle, fpg._get_device_handle = saved_handle
        fpg.foreach_all_gather, fpg.foreach_reduce = saved_fns
        fpg.FSDPParamGroup._validate_no_meta_params = saved_validate


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _decoder_layers(model):
    import torch

    for m in model.modules():
        for child in m.children():
            if isinstance(child, torch.nn.ModuleList) and len(child) and "DecoderLayer" in type(child[0]).__name__:
                return list(child)
    raise MemplanError("no decoder layers found to shard")


def _fully_shard(model, train: TrainSpec) -> None:
    """FSDP2 as `accelerate launch` wraps it: accelerate's own fsdp2_prepare_model (utils/fsdp_utils.py), with the
    plugin the profile's config file makes in each rank (memplan.profile.accelerate_config.fsdp_plugin), so that the
    rank trace and the profile shard the same units (see the module docstring)."""
    import types

    import torch
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    from memplan.profile.accelerate_config import fsdp_plugin

    plugin = fsdp_plugin(train, type(_decoder_layers(model)[0]).__name__)
    # the attributes fsdp2_prepare_model reads from its Accelerator (mixed_precision 'no', as the config file)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                        is_main_process=False, device=torch.device("cpu"), torch_device_mesh=None)
    # fsdp2_prepare_model takes model.state_dict() for its cpu_ram_efficient_loading path only (off here, as in
    # the config file); bitsandbytes' 4-bit state dict reads values (.item()), which meta tensors do not have
    model.state_dict = lambda *args, **kwargs: {}
    try:
        fsdp2_prepare_model(accelerator, model)
    finally:
        del model.state_dict


def run_rank_trace(model: ModelSpec, train: TrainSpec, *, real: bool = False, steps: int = 2,
                   keep_timeline: bool = False):
    """Rank 0's step of `train.gpus` data-parallel ranks, on meta tensors (any size) or real CPU tensors; a
    memplan.trace.runner.TraceResult whose components include comm_buffers."""
    import torch

    from memplan import recipe
    from memplan.trace.attribution import Attribution, register_model
    from memplan.trace.build import build_model
    from memplan.trace.kernels import (
        gemm_4bit_cuda_semantics,
        meta_params4bit_deepcopy,
        patched,
    )
    from memplan.trace.runner import TraceResult
    from memplan.trace.toolbox import int8_mode, offload_notes, toolbox
    from memplan.trace.tracker import CATEGORIES, PHASES, LiveBytesTracker

    why = traceable(train)
    if why:
        raise MemplanError(why)
    t0 = time.perf_counter()
    notes = [f"rank 0 of {train.gpus} ({train.strategy}) on a fake process group, "
             f"{'real CPU' if real else 'meta'} tensors"]
    strategy = train.strategy
    threads = torch.get_num_threads()
    with fake_process_group(train.gpus), warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        with torch.no_grad():
            hf = build_model(model, train, real=real, notes=notes)
        with meta_params4bit_deepcopy(enabled=not real and train.dora and train.bits == 4):
            peft_model = recipe.apply_recipe(hf, model, train)
        box = stack.enter_context(toolbox(train, peft_model, model.model_type, notes, real))
        tracker = LiveBytesTracker(keep_timeline=keep_timeline)
        if strategy in ("fsdp", "fsdp-grad-op"):
            _fully_shard(peft_model, train)
            wrapped = peft_model
        register_model(tracker, peft_model)
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            tracker.default_category = "comm_buffers"
            with tracker, _ddp_on_meta(enabled=not real):
                wrapped = DistributedDataParallel(peft_model)  # its Reducer allocates the gradient buckets here
            # The fake backend's allreduce completes with no result; DDP's default hook returns the reduced
            # bucket, which an in-place allreduce leaves in the bucket buffer itself.
            wrapped.register_comm_hook(None, _bucket_in_place)
            wrapped._pre_forward = _labeled(tracker, wrapped._pre_forward)  # rebuilds the buckets after step 1
            if not real:
                wrapped.reducer = _NoRebuild(wrapped.reducer)
            tracker.default_category = "temporaries"
        elif strategy == "none":
            wrapped = peft_model
        params = recipe.trainable_parameters(peft_model)
        optimizer = recipe.make_optimizer(params, train, paged=False)
        torch.manual_seed(0)
        if real:
            input_ids = torch.randint(0, model.vocab_size, (train.batch_size, train.seq_len))
        else:
            input_ids = torch.empty((train.batch_size, train.seq_len), dtype=torch.long, device="meta")
        tracker.register(input_ids, "activations", "input_ids")
        tracker.phase_peaks["load"] = tracker.current
        attribution = Attribution(tracker, peft_model)
        marks: dict[str, int] = {}

        def finish(phase):
            survivors = [r for r in tracker._live.values() if r.event >= marks[phase] and r.phase == phase]
            if phase == "forward":
                for r in survivors:
                    if r.category == "temporaries":
                        r.category = "activations"
            elif phase == "backward":
                for p in params:
                    if p.grad is not None:
                        rec = tracker.record_of(_local(p.grad))
                        if rec is not None:
                            rec.category = "gradients"
            elif phase == "optimizer":
                for r in survivors:
                    if r.category == "temporaries":
                        r.category = "optimizer_states"

        def on_phase(phase):
            if tracker.phase in marks:
                finish(tracker.phase)
            tracker.phase = phase
            marks[phase] = tracker.events
            attribution.start_phase(phase)

        gemm = gemm_4bit_cuda_semantics() if train.bits == 4 else int8_mode(train)
        comm = contextlib.ExitStack()
        if strategy.startswith("fsdp"):
            comm.enter_context(_comm_labels(tracker))
            if not real:
                comm.enter_context(fsdp2_on_meta(peft_model))
        try:
            with patched(train), comm, tracker, gemm:
                for _ in range(steps):
                    recipe.train_step(wrapped, optimizer, input_ids, on_phase, box.step_context(), train,
                                      box.fused_loss)
                    finish("optimizer")
        except MemplanError:
            raise
        except Exception as e:
            raise MemplanError(f"rank trace of {model.name} failed in {tracker.phase}: {e.__class__.__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from e
        finally:
            attribution.close()
            torch.set_num_threads(threads)
        notes.extend(offload_notes(train, box, steps))
        records = tracker.peak_records()
        comps = tracker.by_category(records)
        top = [r.to_dict() for r in records[:15]]
        result = TraceResult(
            model=model.name, params_total=model.total_params, params_trainable=sum(p.numel() for p in params),
            config=train.to_dict(), components={c: comps.get(c, 0) for c in (*CATEGORIES, "comm_buffers")},
            peak_bytes=tracker.peak, peak_phase=tracker.peak_phase,
            phases={p: tracker.phase_peaks.get(p, 0) for p in PHASES}, top_tensors=top,
            timeline=list(tracker.timeline), notes=notes, real=real, steps=steps, host=box.host(steps))
        tracker.stop()
        del optimizer, wrapped, peft_model, hf, params, tracker, attribution
    gc.collect()
    result.wall_s = time.perf_counter() - t0
    return result
