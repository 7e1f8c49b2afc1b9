"""Base-model weights as they sit in GPU memory after loading (and after prepare_model_for_kbit_training).

Storage per quantized linear weight of n elements (bitsandbytes 0.50, functional.quantize_4bit / Int8Params):
  nf4/fp4: packed uint8, two values per byte: ceil(n/2) B; one absmax per 64-element block (Linear4bit's
           blocksize=64): fp32 4 B each, or with double quantization (compress_statistics=True) a uint8 per
           block + the nested state: one fp32 absmax per 256 blocks, plus a fp32 offset scalar. Each QuantState
           holds its own 16-entry fp32 code of the 4-bit type (get_4bit_type) and, nested, its own copy of the
           256-entry fp32 dynamic map (quantize_blockwise moves name2qmap["dynamic"] to the weight's device: a
           copy per weight; the meta trace counts one per weight).
  int8:    LLM.int8 (Dettmers et al. 2022), Linear8bitLt with has_fp16_weights=False: int8 weight, n B, plus one
           fp32 scale per output row (SCB).
Everything not quantized — embeddings, lm_head (transformers' get_keys_to_not_convert keeps the output embedding),
norms, linear biases, MoE expert tensors (3-D parameters, not nn.Linear) and linears that are nn.Linear
subclasses (Falcon) — stays in the load dtype, which prepare_model_for_kbit_training casts to fp32
(peft/utils/other.py: every fp16/bf16 parameter that is not Params4bit). Under transformers 4 the MoE experts and
router are nn.Linear modules and are quantized like any other linear (experts.py).
"""
from __future__ import annotations

from memplan.estimate import experts
from memplan.spec import DTYPES, ModelSpec, TrainSpec

NF4_BLOCK = 64  # bitsandbytes Linear4bit / Params4bit blocksize
NESTED_BLOCK = 256  # double quantization: blocksize of the nested quantize_blockwise on the absmax
FP32 = 4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def quantized_bytes(n: int, out_features: int, train: TrainSpec) -> tuple[int, int]:
    """(weight bytes, quantization-state bytes) of one quantized linear weight with n elements."""
    if train.bits == 8:
        return n, out_features * FP32
    blocks = _ceil_div(n, NF4_BLOCK)
    code = 16 * FP32
    if train.double_quant:
        state = blocks + _ceil_div(blocks, NESTED_BLOCK) * FP32 + FP32 + code + 256 * FP32
    else:
        state = blocks * FP32 + code
    return _ceil_div(n, 2), state


def unquantized_dtype_bytes(train: TrainSpec) -> int:
    """Bytes per element of every parameter that is not quantized, as it sits during training."""
    if train.bits == 32:
        return 4
    if train.upcast_applies:
        return 4
    return DTYPES[train.compute_dtype]


def weights(model: ModelSpec, train: TrainSpec) -> dict[str, int]:
    """{'weights_quantized', 'quant_state', 'weights_unquantized'} in bytes."""
    ub = unquantized_dtype_bytes(train)
    q_bytes = state_bytes = 0
    plain_params = model.embedding_params + model.lm_head_params + model.other_params
    linears = [(n, lin) for n, layer in model.layers for lin in layer.linears] + [(1, lin) for lin in model.other_linears]
    linears += [(n * k, lin) for n, layer in model.layers for k, lin in experts.layer_linears(model, layer, train)]
    for n, lin in linears:
        if train.quantized and (lin.quantizable or train.transformers == 4):
            w, s = quantized_bytes(lin.weight_numel, lin.out_features, train)
            q_bytes += n * w
            state_bytes += n * s
            plain_params += n * (lin.out_features if lin.bias else 0)
        else:
            plain_params += n * lin.numel
    moe_linear = experts.linear_experts(train)  # transformers 4: experts and router counted as linears above
    for n, layer in model.layers:
        plain_params += n * (layer.norm_params + (0 if moe_linear else layer.expert_params + layer.router_params))
    return {"weights_quantized": q_bytes, "quant_state": state_bytes, "weights_unquantized": plain_params * ub}


def load_transient(model: ModelSpec, train: TrainSpec) -> int:
    """The largest tensor that exists twice for a moment while loading: a linear's weight in the load dtype
    before bitsandbytes quantizes it, or a parameter's 16-bit original while prepare_model_for_kbit_training
    writes its fp32 copy."""
    load_bytes = 4 if train.bits == 32 else DTYPES[train.compute_dtype]
    biggest = experts.max_quantized_numel(model, train) if train.quantized else 0
    if train.upcast_applies:
        fused = 0 if experts.linear_experts(train) else max(layer.expert_params for _, layer in model.layers) // 2
        biggest = max(biggest, model.embedding_params, model.lm_head_params, fused)
    return biggest * load_bytes
