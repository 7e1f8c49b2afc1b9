"""Trainable parameters: LoRA adapters (Hu et al. 2021), DoRA magnitudes (Liu et al. 2024), modules_to_save
copies, or every parameter for full fine-tuning.

A LoRA adapter on a linear of shape (in, out) adds A: r x in and B: out x r (peft/tuners/lora/layer.py,
update_layer). PEFT's get_peft_model(autocast_adapter_dtype=True) keeps adapters in fp32 even on a bf16 base.
DoRA adds one magnitude vector of `out` elements per adapted linear. modules_to_save wraps the module in a
ModulesToSaveWrapper holding a trainable deep copy: the original stays, the copy is extra.
"""
from __future__ import annotations

from memplan.errors import MemplanError
from memplan.estimate import experts
from memplan.estimate.weights import unquantized_dtype_bytes
from memplan.spec import DTYPES, Linear, ModelSpec, TrainSpec

# Which linear names each target set means, by the names transformers gives them. "qv" on a fused-attention
# model (Phi-3 qkv_proj, Falcon / GPT-NeoX query_key_value) adapts the fused projection: PEFT's default targets
# for those model types (peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
QV = {"q_proj", "v_proj", "qkv_proj", "query_key_value"}
ATTN = QV | {"k_proj", "o_proj", "out_proj", "dense"}


def is_target(lin: Linear, train: TrainSpec) -> bool:
    t = train.lora_targets
    if t == "all-linear":  # every nn.Linear but the output layer (peft INCLUDE_LINEAR_LAYERS_SHORTHAND)
        return True
    if t == "qv":
        return lin.name in QV
    if t == "attn":
        return lin.name in ATTN
    return lin.name in t


def targeted(model: ModelSpec, train: TrainSpec) -> list[tuple[int, Linear]]:
    """(count, linear) for every adapted linear in the model."""
    if train.method != "lora":
        return []
    found = [(n, lin) for n, layer in model.layers for lin in layer.linears if is_target(lin, train)]
    found += [(1, lin) for lin in model.other_linears if is_target(lin, train)]
    # transformers 4: experts and router are nn.Linear modules that "all-linear" (or their names) reach
    found += [(n * k, lin) for n, layer in model.layers for k, lin in experts.layer_linears(model, layer, train)
              if is_target(lin, train)]
    if not found:
        names = sorted({lin.name for _, layer in model.layers for lin in layer.linears}
                       | {lin.name for _, layer in model.layers for _, lin in experts.layer_linears(model, layer, train)})
        raise MemplanError(f"lora-targets {train.lora_targets!r} match no linear of {model.name}; "
                           f"its linears: {', '.join(names)}")
    return found


def adapter_params(model: ModelSpec, train: TrainSpec) -> int:
    total = 0
    for n, lin in targeted(model, train):
        total += n * (train.lora_r * (lin.in_features + lin.out_features) + (lin.out_features if train.dora else 0))
    return total


def layer_adapter_bytes(model: ModelSpec, train: TrainSpec, layer) -> int:
    """Bytes of one decoder layer's adapters (and their gradients): its own, which its backward makes."""
    if train.method != "lora":
        return 0
    n = sum(train.lora_r * (lin.in_features + lin.out_features) + (lin.out_features if train.dora else 0)
            for lin in layer.linears if is_target(lin, train))
    return n * DTYPES[train.lora_dtype]


def token_embedding_params(model: ModelSpec) -> int:
    """The token embedding alone: what PEFT's modules_to_save copies for embed_tokens (and a tied lm_head's weight).
    OPT's embedding_params hold its learned positions too (embed_positions, a module of its own, not copied):
    V x word_embed_proj_dim is the token table (modeling_opt.py OPTDecoder)."""
    if model.model_type == "opt":
        return model.vocab_size * int(model.hf_config.get("word_embed_proj_dim") or model.hidden_size)
    return model.embedding_params


def modules_to_save_params(model: ModelSpec, train: TrainSpec) -> int:
    tokens = token_embedding_params(model)
    sizes = {"lm_head": model.lm_head_params or tokens, "embed_tokens": tokens, "embed_in": tokens,
             "embed_out": model.lm_head_params, "word_embeddings": tokens}
    total = 0
    for name in train.modules_to_save:
        if name not in sizes:
            raise MemplanError(f"modules-to-save {name!r} is not supported; choose from: {', '.join(sizes)}")
        if name == "embed_out" and train.transformers >= 5:  # PEFT would match nothing and train no copy
            raise MemplanError("modules-to-save embed_out: transformers 5 names GPT-NeoX's output layer lm_head "
                               "(transformers/conversion_mapping.py renames embed_out.*); use lm_head")
        total += sizes[name]
    return total


def trainable(model: ModelSpec, train: TrainSpec) -> dict:
    """Trainable parameter count and bytes (their gradients match)."""
    if train.method == "full":
        b = 4 if train.bits == 32 else DTYPES[train.compute_dtype]
        return {"params": model.total_params, "bytes": model.total_params * b}
    adapters = adapter_params(model, train)
    saved = modules_to_save_params(model, train)
    saved_bytes = saved * unquantized_dtype_bytes(train)
    return {"params": adapters + saved, "bytes": adapters * DTYPES[train.lora_dtype] + saved_bytes}


OUTPUT_NAMES = ("lm_head", "embed_out")
INPUT_NAMES = ("embed_tokens", "embed_in", "word_embeddings")


def head_and_embedding_grads(model: ModelSpec, train: TrainSpec) -> dict:
    """Gradient bytes of a trained output layer and input embedding, which autograd makes at the two ends of the
    backward: the head's first (its matmul is the loss's input), the embedding's last (EmbeddingBackward0).
    Tied (full fine-tuning of a model whose lm_head is the embedding): one parameter, whose AccumulateGrad waits
    for both, so the head's V x H gradient waits in the engine's input buffer until the embedding's arrives,
    and the two are summed out of place (torch/csrc/autograd/input_buffer.cpp; the meta trace shows the three
    V x H tensors at once). modules_to_save copies are separate modules: never tied."""
    if train.method == "full":
        gb = 4 if train.bits == 32 else DTYPES[train.compute_dtype]
        tied = model.lm_head_params == 0
        vh = model.vocab_size * model.hidden_size
        return {"head": vh * gb, "embed": model.embedding_params * gb, "tied": tied}
    gb = unquantized_dtype_bytes(train)
    saved = set(train.modules_to_save)
    tokens = token_embedding_params(model)
    head = (model.lm_head_params or tokens) if saved & set(OUTPUT_NAMES) else 0
    embed = tokens if saved & set(INPUT_NAMES) else 0
    return {"head": head * gb, "embed": embed * gb, "tied": False}
