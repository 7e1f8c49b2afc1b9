"""Run one real training step on meta tensors (or, for small models, real CPU tensors) and count live bytes.

The step is the user's recipe (memplan/recipe.py) on the real transformers / PEFT / bitsandbytes code:

1. the model is built from its config.json on the meta device (real=True: on the CPU with random weights);
2. bits 4/8: transformers' own replace_with_bnb_linear swaps every `type(m) is nn.Linear` but the output layer
   (transformers' get_keys_to_not_convert) for bitsandbytes Linear4bit / Linear8bitLt, whose weights are the
   output of bitsandbytes' quantize_4bit / int8_vectorwise_quant run on the (meta) weight; the model is marked
   is_loaded_in_4bit / is_loaded_in_8bit as from_pretrained does, so PEFT wraps those layers with its
   bitsandbytes LoRA layers and prepare_model_for_kbit_training upcasts what from_pretrained would leave;
3. recipe.apply_recipe (upcast, HF gradient checkpointing, LoRA), model.train(), recipe.make_optimizer;
4. two recipe.train_step calls under the tracker; the second one is the steady state (optimizer states exist).

What the trace changes so that the step models a CUDA GPU and runs on meta (each listed in docs/trace.md):
- attention (--attention sdpa): torch.nn.functional.scaled_dot_product_attention is routed to `fused_attention`,
  which allocates what PyTorch's flash-attention kernel allocates on CUDA (FlashAttention-2, flash_api.cpp):
  forward output + fp32 log-sum-exp, backward dq/dk/dv (+ the fp32 dq accumulator, softmax_d, and expanded dk/dv
  for GQA, freed when the kernel returns). No b·a·s² scores. --attention eager runs transformers' eager code.
  K/V with fewer heads than Q and no enable_gqa (Falcon-7B's multi-query) is refused by every fused kernel in
  torch 2.13, so CUDA runs SDPA's math kernel: the trace runs it too (b·a·s² fp32 scores) and notes it. An explicit
  mask (Falcon) means CUDA's memory-efficient kernel: the additive b·s² bias SDPA makes is kept for the backward.
- dropout: F.dropout in training is run as aten.native_dropout (the fused CUDA kernel: a 1-byte bool mask) instead
  of the CPU/meta decomposition (a mask in the input's dtype).
- bitsandbytes gemm_4bit: on meta its fake kernel allocates only the output; the trace runs what bitsandbytes'
  CUDA backend runs for training-sized batches (> 1536 tokens, and most large weights below that): absmax
  dequantization, the dequantized weight in the compute dtype, then F.linear (backends/cuda/ops.py,
  _dequant_linear_fallback).
- transformers.masking_utils.find_packed_sequence_indices (data-dependent) returns None: the batch is one
  unpadded, unpacked sequence per row, as the GPU run would conclude from position_ids = arange. Under
  transformers 4 it is left alone: 4.57 always returns a tensor (no .item()), so the causal mask is built, as on
  a GPU under 4.57.
- transformers 4 (the installed major, memplan/stack.py): its sparse-MoE loop over nn.Linear experts needs
  routing values, so on meta it runs with balanced routing (kernels._balanced_moe_forward); 4.x rotary
  embeddings open torch.autocast on the tensor's device type, run as the CPU's on meta. The trace refuses a
  --transformers that is not the installed major.
- MoE: transformers 5 routes with its default "grouped_mm" experts: its memory depends only on
  tokens × top-k, not on which experts are hit. On meta the router's top-k indices are whatever the meta kernel
  says (no values), so routing is data-free; with real tensors the routing is the random model's, and the bytes
  are the same.

Where each part lives: kernels.py (the CUDA kernels' memory models above), build.py (the model from its config,
quantized), attribution.py (component and module of each tensor), tracker.py (live bytes), this file (the run).
"""
from __future__ import annotations

import gc
import time
import warnings
from dataclasses import dataclass, field

from memplan.errors import MemplanError
from memplan.spec import ModelSpec, TrainSpec
from memplan.stack import check_runs_installed, stack
from memplan.stack import describe as describe_stack
from memplan.trace.attribution import Attribution, finish_phase, register_model
from memplan.trace.build import build_model
from memplan.trace.kernels import (
    attention_notes,
    gemm_4bit_cuda_semantics,
    meta_params4bit_deepcopy,
    patched,
)
from memplan.trace.toolbox import int8_mode, offload_notes, toolbox
from memplan.trace.tracker import CATEGORIES, PHASES, LiveBytesTracker

TOP_TENSORS = 15


@dataclass
class TraceResult:
    model: str
    params_total: int
    params_trainable: int
    config: dict
    components: dict
    peak_bytes: int
    peak_phase: str
    phases: dict
    top_tensors: list
    timeline: list = field(repr=False, default_factory=list)
    notes: list = field(default_factory=list)
    real: bool = False
    wall_s: float = 0.0
    steps: int = 2
    phase_components: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)  # offloaded activations: host peak, PCIe bytes per step
    stack: dict = field(default_factory=lambda: stack(0))  # the installed versions the trace ran
    allocations: list | None = field(repr=False, default=None)  # the allocation stream (record_allocations=True)

    @property
    def stack_line(self) -> str:
        return "stack: " + describe_stack(self.stack)

    def to_dict(self, timeline_csv: str | None = None) -> dict:
        return {
            "model": self.model,
            "params": {"total": self.params_total, "trainable": self.params_trainable},
            "config": self.config,
            "components": dict(self.components),
            "peak_bytes": self.peak_bytes,
            "device_total_bytes": None,
            "peak_phase": self.peak_phase,
            "phases": dict(self.phases),
            "top_tensors": self.top_tensors,
            "timeline_csv": timeline_csv,
            "notes": list(self.notes),
            "device": "cpu" if self.real else "meta",
            "wall_s": round(self.wall_s, 3),
            "host": dict(self.host),
            "stack": {**self.stack, "source": dict(self.stack.get("source", {}))},
        }


def run_trace(model: ModelSpec, train: TrainSpec, *, real: bool = False, steps: int = 2,
              budget_bytes: int | None = None, keep_timeline: bool = True,
              record_allocations: bool = False, warm_optimizer: bool = False) -> TraceResult:
    """Trace `steps` training steps of `model` with `train`; see the module docstring.

    warm_optimizer: before the traced steps, create the optimizer's states by one optimizer.step() on zero
    gradients (under the tracker, as the "optimizer" phase), so a single traced step is already the steady state:
    `steps=1, warm_optimizer=True` gives the peaks of `steps=2` at about half the cost
    (tests/test_validate_random.py checks they are equal). memplan validate uses it."""
    import torch

    from memplan import recipe

    if steps < 1:
        raise MemplanError("steps must be at least 1")
    check_runs_installed(train.transformers, "the trace")
    t0 = time.perf_counter()
    notes: list[str] = list(model.notes)  # how the config was read (auto_map, aliases, derived spec)
    if train.optimizer.startswith("paged"):
        notes.append(f"{train.optimizer}: traced as its non-paged twin (bitsandbytes' paged buffers need CUDA "
                     "managed memory); same bytes, evictable to host memory on a GPU")
    if train.quantized and train.bits == 8 and real:
        notes.append("8-bit on real CPU tensors runs bitsandbytes' CPU matmul (MatMul8bitFp), not the CUDA one")
    torch_threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            hf = build_model(model, train, real=real, notes=notes)
        with meta_params4bit_deepcopy(enabled=not real and train.dora and train.bits == 4):
            peft_model = recipe.apply_recipe(hf, model, train)
    except MemplanError:
        raise
    except Exception as e:
        raise MemplanError(f"cannot set up {model.name} for training ({e.__class__.__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from e
    with toolbox(train, peft_model, model.model_type, notes, real) as box:
        return _run(model, train, peft_model, hf, notes, box, real=real, steps=steps, budget_bytes=budget_bytes,
                    keep_timeline=keep_timeline, record_allocations=record_allocations,
                    warm_optimizer=warm_optimizer, t0=t0, torch_threads=torch_threads)


def _run(model, train, peft_model, hf, notes, box, *, real, steps, budget_bytes, keep_timeline, record_allocations,
         warm_optimizer, t0, torch_threads) -> TraceResult:
    """The traced steps of run_trace, inside the toolbox's contexts."""
    import torch

    from memplan import recipe

    params = recipe.trainable_parameters(peft_model)
    total = sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
                for n, p in _unique_named_params(peft_model) if "lora_" not in n and "modules_to_save" not in n)
    trainable = sum(p.numel() for p in params)
    optimizer = recipe.make_optimizer(params, train, paged=False)
    device = "cpu" if real else "meta"
    if real:
        torch.manual_seed(0)
        input_ids = torch.randint(0, model.vocab_size, (train.batch_size, train.seq_len), device=device)
    else:
        input_ids = torch.empty((train.batch_size, train.seq_len), dtype=torch.long, device=device)

    tracker = LiveBytesTracker(budget_bytes=budget_bytes, keep_timeline=keep_timeline,
                               record_allocations=record_allocations)
    register_model(tracker, peft_model)
    tracker.register(input_ids, "activations", "input_ids")
    tracker.phase_peaks["load"] = tracker.current
    attribution = Attribution(tracker, peft_model)
    phase_marks: dict[str, int] = {}

    def on_phase(phase: str) -> None:
        prev = tracker.phase
        if prev in phase_marks:
            finish_phase(tracker, prev, phase_marks[prev], peft_model, optimizer)
        tracker.phase = phase
        phase_marks[phase] = tracker.events
        attribution.start_phase(phase)

    gemm_mode = gemm_4bit_cuda_semantics() if train.bits == 4 else int8_mode(train)
    try:
        with patched(train) as fused, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tracker, gemm_mode:
                if warm_optimizer:
                    on_phase("optimizer")
                    recipe.warm_optimizer(optimizer, params)
                    finish_phase(tracker, "optimizer", phase_marks["optimizer"], peft_model, optimizer)
                for _ in range(steps):
                    recipe.train_step(peft_model, optimizer, input_ids, on_phase, box.step_context(), train,
                                      box.fused_loss)
                    finish_phase(tracker, "optimizer", phase_marks["optimizer"], peft_model, optimizer)
        notes.extend(attention_notes(model, fused))
    except MemplanError:
        raise
    except Exception as e:
        from memplan.trace.tracker import TrackerOutOfMemory

        if isinstance(e, TrackerOutOfMemory):
            raise
        raise MemplanError(f"trace of {model.name} failed in {tracker.phase} ({tracker.module or 'no module'}): "
                           f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        attribution.close()
        torch.set_num_threads(torch_threads)
    notes.extend(offload_notes(train, box, steps))

    records = tracker.peak_records()
    components = tracker.by_category(records)
    top = [r.to_dict() for r in records[:TOP_TENSORS]]
    for t in top:
        t["module"] = t["module"].replace("base_model.model.", "", 1)
    phases = {p: tracker.phase_peaks.get(p, 0) for p in PHASES}
    result = TraceResult(
        model=model.name, params_total=total, params_trainable=trainable, config=train.to_dict(),
        components={c: components.get(c, 0) for c in CATEGORIES}, peak_bytes=tracker.peak,
        peak_phase=tracker.peak_phase, phases=phases, top_tensors=top,
        timeline=list(tracker.timeline), notes=notes, real=real, steps=steps, allocations=tracker.allocations,
        host=box.host(steps),
    )
    tracker.stop()
    del optimizer, peft_model, hf, params, tracker, attribution
    gc.collect()
    result.wall_s = time.perf_counter() - t0
    return result


def _unique_named_params(model):
    seen = set()
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield n, p
