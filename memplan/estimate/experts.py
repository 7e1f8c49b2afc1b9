"""MoE experts by transformers major: nn.Linear modules under 4.x, fused 3-D parameters under 5.x.

transformers 4.57.6 (the last 4.x release) builds each expert as its own MLP of nn.Linear modules and the router
as an nn.Linear(hidden, num_experts): models/mixtral/modeling_mixtral.py MixtralBlockSparseTop2MLP (w1, w3:
hidden -> intermediate, w2: intermediate -> hidden) and MixtralSparseMoeBlock.gate; models/qwen2_moe and qwen3_moe
Qwen*MoeMLP (gate_proj, up_proj, down_proj) and Qwen*MoeSparseMoeBlock.gate. So bitsandbytes quantizes every
expert and the router (integrations/bitsandbytes.py replace_with_bnb_linear converts every nn.Linear but lm_head),
each with its own quantization state, and PEFT's "all-linear" adapts them all (peft/tuners/tuners_utils.py
_maybe_include_all_linear_layers: every nn.Linear but the output layer).

transformers 5 stores the experts as fused 3-D parameters (gate_up_proj [E, 2I, H], down_proj [E, H, I]) and the
router as an nn.Parameter: bitsandbytes leaves them in the load dtype (prepare_model_for_kbit_training then makes
them fp32) and PEFT's linear targets do not reach them. No bitsandbytes release up to 0.50.2 quantizes 3-D
expert parameters (bitsandbytes issue #1849; an `Experts4bit` module is upstream work, not released):
EXPERTS_4BIT_SINCE names the first release that does, once one exists, and the weights then follow it.
"""
from __future__ import annotations

from memplan.spec import LayerSpec, Linear, ModelSpec, TrainSpec

EXPERTS_4BIT_SINCE: str | None = None  # bitsandbytes issue #1849: no release quantizes fused 3-D experts yet

# (gate, up, down) attribute names of one expert's linears under transformers 4.57.6.
_NAMES = {"mixtral": ("w1", "w3", "w2")}
_DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


def linear_experts(train: TrainSpec) -> bool:
    """True when the experts are nn.Linear modules (transformers 4)."""
    return train.transformers == 4


def expert_mlp(model: ModelSpec, layer: LayerSpec) -> tuple[Linear, Linear, Linear]:
    """One expert's (gate, up, down) linears under transformers 4."""
    g, u, d = _NAMES.get(model.model_type, _DEFAULT_NAMES)
    h, i = model.hidden_size, layer.expert_intermediate
    return Linear(g, h, i), Linear(u, h, i), Linear(d, i, h)


def router(model: ModelSpec, layer: LayerSpec) -> Linear:
    return Linear("gate", model.hidden_size, layer.num_experts)


def layer_linears(model: ModelSpec, layer: LayerSpec, train: TrainSpec) -> list[tuple[int, Linear]]:
    """(copies in the layer, linear) for the experts and router when they are nn.Linear modules, else []."""
    if not (layer.num_experts and linear_experts(train)):
        return []
    return [(layer.num_experts, lin) for lin in expert_mlp(model, layer)] + [(1, router(model, layer))]


def max_quantized_numel(model: ModelSpec, train: TrainSpec) -> int:
    """Elements of the largest quantized linear weight (its dequantized copy is bitsandbytes' biggest temporary)."""
    biggest = model.max_quantized_numel
    if train.transformers == 4:  # 4.x quantizes nn.Linear subclasses too (Falcon's FalconLinear)
        biggest = max((lin.weight_numel for _, layer in model.layers for lin in layer.linears), default=0)
    for _, layer in model.layers:
        for _, lin in layer_linears(model, layer, train):
            biggest = max(biggest, lin.weight_numel)
    return biggest


def backward_moment(model: ModelSpec, layer: LayerSpec, train: TrainSpec, e: int) -> tuple[int, int]:
    """Per token (released, working set) at a trained transformers-5 experts block's gate_up grouped_mm backward,
    the moment its weight gradients (down_proj's already made, gate_up_proj's being written) sit beside the
    gradient of every token-slot's gate_up output (2I wide) and of its gathered input (integrations/moe.py 5.24,
    GroupedMMBackward after SplitBackward0), and the layer output's gradient. By then the backward of the routing
    weight's product, of down_proj's grouped_mm and of act(gate) * up released what they saved: the scaled output,
    the product (down_proj's input), the act output and the gate_up output; the gathered input (gate_up's own
    saved input) and the routing indices remain. (0, 0) when the experts are not trained 3-D parameters."""
    if layer.mlp != "moe" or not layer.experts_per_token or linear_experts(train) or train.method != "full":
        return 0, 0
    k, i, h = layer.experts_per_token, layer.expert_intermediate, model.hidden_size
    return k * (4 * i * e + h * e), k * (2 * i * e + h * e) + h * e
