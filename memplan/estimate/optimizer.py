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
                   one column vector per >=2-D tensor (shape[:-1] and shape[:-2] + shape[-1:]), the full moment for
                   1-D tensors, all fp32: step() upcasts a 16-bit grad (grad.float()) and makes the states
                   `.to(grad)` (transformers/optimization.py, Adafactor.step, 5.24). The step walks the
                   parameters one at a time, each with param-sized fp32 temporaries (see step_temporaries).
"""
from __future__ import annotations

from memplan.estimate.lora import is_target, targeted
from memplan.estimate.weights import unquantized_dtype_bytes
from memplan.spec import DTYPES, ModelSpec, TrainSpec

BNB_BLOCK = 256
BNB_MIN_8BIT = 4096


def _param_shapes(model: ModelSpec, train: TrainSpec) -> list[tuple[int, tuple[int, ...]]]:
    """(count, shape) of every trainable tensor, for optimizers whose state depends on shapes. LoRA: A (r x in),
    B (out x r), DoRA magnitude (out). Full: transformers 5's fused experts are 3-D (gate_up_proj [E, 2I, H],
    down_proj [E, H, I]), the router [E, H]; norms are 1-D (lumped: only their total matters)."""
    if train.method == "full":
        shapes = [(1, (model.vocab_size, model.hidden_size))] * (1 + (model.lm_head_params > 0))
        for n, layer in model.layers:
            shapes += [(n, (lin.out_features, lin.in_features)) for lin in layer.linears]
            shapes += [(n, (lin.out_features,)) for lin in layer.linears if lin.bias]
            e, i, h = layer.num_experts, layer.expert_intermediate, model.hidden_size
            if layer.expert_params and layer.expert_params == 3 * e * i * h:
                shapes += [(n, (e, 2 * i, h)), (n, (e, h, i))]
            elif layer.expert_params:
                shapes.append((n, (layer.expert_params,)))
            if layer.router_params:
                shapes.append((n, (layer.num_experts, layer.router_params // max(layer.num_experts, 1))))
            shapes.append((n, (layer.norm_params,)))
        return shapes
    shapes = []
    for n, lin in targeted(model, train):
        shapes += [(n, (train.lora_r, lin.in_features)), (n, (lin.out_features, train.lora_r))]
        if train.dora:
            shapes.append((n, (lin.out_features,)))
    if train.modules_to_save:
        shapes.append((len(train.modules_to_save), (model.vocab_size, model.hidden_size)))
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _adafactor_state(shape: tuple[int, ...]) -> int:
    """Elements of Adafactor's second moment for one tensor (Adafactor._get_options: factored when >= 2-D)."""
    if len(shape) < 2:
        return _numel(shape)
    return _numel(shape[:-1]) + _numel(shape[:-2]) * shape[-1]


def states(model: ModelSpec, train: TrainSpec, trainable_params: int, trainable_bytes: int) -> int:
    opt = train.optimizer
    if opt == "adamw":
        return 2 * trainable_bytes
    if opt == "paged-adamw":
        return 2 * 4 * trainable_params
    if opt == "sgd":
        return trainable_bytes
    shapes = _param_shapes(model, train)
    if opt == "adafactor":
        return sum(n * _adafactor_state(shape) for n, shape in shapes) * 4
    total = qmaps = 0  # 8-bit AdamW
    for n, shape in shapes:
        numel = _numel(shape)
        if numel < BNB_MIN_8BIT:
            total += n * 2 * numel * 4
        else:
            total += n * 2 * (numel + -(-numel // BNB_BLOCK) * 4)
            qmaps = 2 * 256 * 4  # the two quantization maps (qmap1, qmap2), shared by every 8-bit state
    return total + qmaps


def step_temporaries(train: TrainSpec, trainable_bytes: int, model: ModelSpec | None = None) -> int:
    """Transient bytes inside optimizer.step(): foreach AdamW's sqrt(exp_avg_sq) copy of the whole group; the
    bitsandbytes and SGD kernels update in place. Adafactor (transformers/optimization.py, Adafactor.step) steps
    one parameter at a time, in fp32: a 16-bit parameter gets grad.float() and p.float() copies, and two
    param-sized fp32 tensors meet at each of `update = grad**2 + eps` (grad**2, then the sum),
    `update = _approx_sq_grad(..)` / `exp_avg_sq.rsqrt()` (the new update beside the old) and `p.add_(-update)`
    (the negation beside update): 8 B per element, 16 B if 16-bit. The previous parameter's `update` is still
    bound to the loop variable until `update = grad**2 + eps` replaces it, so it rides on top (4 B per element
    of the previous parameter, in model.parameters() order)."""
    if train.optimizer == "adamw":
        return trainable_bytes
    if train.optimizer != "adafactor" or model is None:
        return 0
    worst, prev = 0, 0
    for numel, elem in _param_sequence(model, train):
        worst = max(worst, prev * 4 + numel * (16 if elem == 2 else 8))
        prev = numel
    return worst


def _param_sequence(model: ModelSpec, train: TrainSpec):
    """(elements, bytes per element) of the trainable tensors in model.parameters() order: the input embedding,
    each layer (its linears in order, then norms / experts / router), the final norm, the output layer; under
    LoRA each adapted linear's lora_A then lora_B (then DoRA's magnitude), the modules_to_save copies where their
    modules sit. Each group of alike layers is walked twice: enough for every consecutive pair."""
    if train.method == "full":
        elem = 4 if train.bits == 32 else DTYPES[train.compute_dtype]
        yield model.embedding_params, elem
        for n, layer in model.layers:
            for _ in range(min(n, 2)):
                for lin in layer.linears:
                    yield lin.numel, elem
                e, i, h = layer.num_experts, layer.expert_intermediate, model.hidden_size
                if layer.expert_params and layer.expert_params == 3 * e * i * h:
                    yield e * 2 * i * h, elem
                    yield e * h * i, elem
                elif layer.expert_params:
                    yield layer.expert_params, elem
                if layer.router_params:
                    yield layer.router_params, elem
                yield layer.norm_params, elem
        yield model.other_params, elem
        if model.lm_head_params:
            yield model.lm_head_params, elem
        return
    lb, ub = DTYPES[train.lora_dtype], unquantized_dtype_bytes(train)
    vh = model.vocab_size * model.hidden_size
    if set(train.modules_to_save) & {"embed_tokens", "embed_in", "word_embeddings"}:
        yield model.embedding_params, ub
    for n, layer in model.layers:
        for _ in range(min(n, 2)):
            for lin in layer.linears:
                if is_target(lin, train):
                    yield train.lora_r * lin.in_features, lb
                    yield lin.out_features * train.lora_r, lb
                    if train.dora:
                        yield lin.out_features, lb
    if set(train.modules_to_save) & {"lm_head", "embed_out"}:
        yield model.lm_head_params or vh, ub


