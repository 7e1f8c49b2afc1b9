"""The memory toolbox (#11) around a traced step, shared by the one-GPU run (runner.py) and the rank run
(distributed.py): Liger's kernels, the fused linear cross-entropy, activation offloading, and the meta stand-ins
that 8-bit weights and Adafactor need. Each model lives in its own module (liger.py, losses.py, offload.py,
kernels.py); this file only opens them for a run and says what it did in the trace's notes."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from memplan.spec import TrainSpec
from memplan.trace.kernels import (
    INT8_OUTLIER_COLUMNS,
    int8_outliers_mode,
    meta_adafactor_scalars,
)
from memplan.trace.losses import make_cce, make_liger
from memplan.trace.offload import (
    HostLedger,
    OffloadActivationsModel,
    checkpoint_offload,
    offload_note,
)


@dataclass
class Toolbox:
    train: TrainSpec
    ledger: HostLedger = field(default_factory=HostLedger)
    fused_loss: object = None  # the fused linear cross-entropy model (losses.py), None for --loss standard
    offload_all: OffloadActivationsModel | None = None

    def step_context(self):
        """What wraps each step's forward and backward (TRL's OffloadActivations under --activation-offload all)."""
        return self.offload_all.step() if self.offload_all else None

    def host(self, steps: int) -> dict:
        return self.ledger.per_step(steps) if self.train.activation_offload != "off" else {}


@contextlib.contextmanager
def toolbox(train: TrainSpec, peft_model, model_type: str, notes: list[str], real: bool):
    """Apply the toolbox flags of `train` to `peft_model` for the steps run inside; yields a Toolbox."""
    box = Toolbox(train)
    if train.liger:
        from memplan.trace.liger import apply_liger_models

        apply_liger_models(peft_model, model_type)
        notes.append("--liger on: Liger's RMSNorm and SwiGLU/GeGLU are modelled from their source "
                     "(memplan/trace/liger.py; Triton needs CUDA); RoPE (in place, same saved sizes) left as is")
    if train.loss != "standard":
        box.fused_loss = {"liger": make_liger, "cce": make_cce}[train.loss]()
        notes.append(f"--loss {train.loss}: the fused linear cross-entropy's allocations are modelled from its "
                     "source (memplan/trace/losses.py: Triton kernels need CUDA); no b·s·V logits")
    if train.bits == 8 and not real:
        notes.append(f"LLM.int8 outlier columns are data-dependent: the meta trace takes {INT8_OUTLIER_COLUMNS} per "
                     "quantized input (Dettmers et al. 2022, §4: emergent outliers sit in ~6 hidden dimensions)")
    if train.activation_offload == "all":
        box.offload_all = OffloadActivationsModel(peft_model, box.ledger)
    try:
        with contextlib.ExitStack() as stack:
            if train.activation_offload == "checkpoints":
                stack.enter_context(checkpoint_offload(box.ledger))
            if train.optimizer == "adafactor":
                stack.enter_context(meta_adafactor_scalars())
            yield box
    finally:
        if box.offload_all:
            box.offload_all.remove()


def int8_mode(train: TrainSpec):
    """The 8-bit matmul's outlier stand-in (kernels.int8_outliers_mode), or nothing for other bits."""
    return int8_outliers_mode() if train.bits == 8 else contextlib.nullcontext()


def offload_notes(train: TrainSpec, box: Toolbox, steps: int) -> list[str]:
    return [offload_note(train, box.ledger, steps)] if train.activation_offload != "off" else []
