"""Optimizer states (created lazily by the first `step()`) and the optimizer step's temporaries.

  adamw            torch.optim.AdamW: exp_avg and exp_avg_sq, zeros_like(param): 2 x param bytes (Kingma & Ba 2015;
                   the `step` counter is a CPU scalar). On CUDA torch picks the foreach implementation, whose
                   _foreach_sqrt(exp_avg_sq) makes one param-sized temporary for the whole group
                   (torch/optim/adamw.py -> adam.py _multi_tensor_adam).
  adamw-8bit       bitsandbytes AdamW8bit (Dettmers et al. 2022, "8-bit optimizers via block-wise quantization"):
                   two uint8 states + one fp32 absmax per 256-element block each; tensors under min_8bit_size
                   (4096 elements) keep 32-bit states (bitsandbytes/optim/optimizer.py, Optimizer8bit.init_state).
  paged-adamw      bitsandbytes PagedAdamW (Optimizer2State, optim_bits=32): two fp32 states whatever the parameter
                   dtype (bitsandbytes/optim/optimizer.py, Optimizer2State.init_state: get_state_buffer(p,
                   dtype=torch.float32)), 8 B per parameter, so a bf16 full fine-tune pays twice torch's states;
                   its fused kernel updates in place (no foreach temporary).
  paged-*          allocated in CUDA managed (unified) memory that the driver can evict to host RAM under
                   pressure; they still count towards the GPU when resident.
  sgd              torch.optim.SGD with momentum (0.9, as memplan/recipe.py runs it): one buffer per parameter.
  adafactor        transformers Adafactor (Shazeer & Stern 2018), beta1=None: factored second moment, one row and
                   one column vector per >=2-D tensor (in the grad dtype), the full moment for 1-D tensors.
"""
from __future__ import annotations

from memplan.estimate.lora import targeted
from memplan.spec import ModelSpec, TrainSpec

BNB_BLOCK = 256
BNB_MIN_8BIT = 4096


def _param_shapes(model: ModelSpec, train: TrainSpec) -> list[tuple[int, int, int]]:
    """(count, rows, cols) of every trainable tensor (cols = 0 for 1-D), for optimizers whose state depends on
    shapes. LoRA: A (r x in), B (out x r), DoRA magnitude (out)."""
    if train.method == "full":
        shapes = [(1, model.vocab_size, model.hidden_size)] * (1 + (model.lm_head_params > 0))
        for n, layer in model.layers:
            shapes += [(n, lin.out_features, lin.in_features) for lin in layer.linears]
            shapes += [(n, lin.out_features, 0) for lin in layer.linears if lin.bias]
            if layer.expert_params:
                shapes.append((n, layer.expert_params, 1))
            shapes.append((n, layer.norm_params + layer.router_params, 0))
        return shapes
    shapes = []
    for n, lin in targeted(model, train):
        shapes += [(n, train.lora_r, lin.in_features), (n, lin.out_features, train.lora_r)]
        if train.dora:
            shapes.append((n, lin.out_features, 0))
    if train.modules_to_save:
        shapes.append((len(train.modules_to_save), model.vocab_size, model.hidden_size))
    return shapes


def states(model: ModelSpec, train: TrainSpec, trainable_params: int, trainable_bytes: int) -> int:
    opt = train.optimizer
    if opt == "adamw":
        return 2 * trainable_bytes
    if opt == "paged-adamw":
        return 2 * 4 * trainable_params
    if opt == "sgd":
        return trainable_bytes
    shapes = _param_shapes(model, train)
    elem = trainable_bytes // max(trainable_params, 1)
    if opt == "adafactor":
        return sum(n * (r + c if c else r) for n, r, c in shapes) * elem
    total = qmaps = 0  # 8-bit AdamW
    for n, r, c in shapes:
        numel = r * max(c, 1)
        if numel < BNB_MIN_8BIT:
            total += n * 2 * numel * 4
        else:
            total += n * 2 * (numel + -(-numel // BNB_BLOCK) * 4)
            qmaps = 2 * 256 * 4  # the two quantization maps (qmap1, qmap2), shared by every 8-bit state
    return total + qmaps


def step_temporaries(train: TrainSpec, trainable_bytes: int) -> int:
    """Transient bytes inside optimizer.step(): foreach AdamW's sqrt(exp_avg_sq) copy of the whole group; the
    bitsandbytes and SGD kernels update in place."""
    return trainable_bytes if train.optimizer == "adamw" else 0
