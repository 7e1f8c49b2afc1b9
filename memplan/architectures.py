"""Hugging Face config.json -> ModelSpec, one function per model_type.

Each builder mirrors the module tree that transformers 5 builds for that model_type (the modeling_*.py file it
names), so parameter counts are exact: tests/test_catalog.py builds every catalog model on the meta device with
transformers and compares. No torch or transformers import here: this is the estimate path.
"""
from __future__ import annotations

from memplan.errors import MemplanError
from memplan.spec import LayerSpec, Linear, ModelSpec

_REQUIRED = {
    "default": ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"),
    "falcon": ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
    "opt": ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "ffn_dim",
            "max_position_embeddings"),
    "qwen2_moe": ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                  "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts", "num_experts_per_tok"),
    "qwen3_moe": ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                  "moe_intermediate_size", "num_experts", "num_experts_per_tok"),
    "mixtral": ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                "num_local_experts", "num_experts_per_tok"),
}


MAX_LAYERS = 100_000  # the deepest published LLMs have a few hundred decoder layers


def _int(cfg: dict, key: str, default=None) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise MemplanError(f"config is missing the field {key!r} (model_type {cfg.get('model_type')!r})")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MemplanError(f"config field {key!r} must be a positive integer, got {value!r}")
    if key == "num_hidden_layers" and value > MAX_LAYERS:  # the estimate walks its layers: refuse, never hang
        raise MemplanError(f"config field 'num_hidden_layers' is {value:,}: more than any model ({MAX_LAYERS:,} "
                           "at most here)")
    return value


def _flag(cfg: dict, key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise MemplanError(f"config field {key!r} must be true or false, got {value!r}")
    return value


def _attention(cfg: dict) -> tuple[int, int, int, int]:
    h = _int(cfg, "hidden_size")
    a = _int(cfg, "num_attention_heads")
    kv = _int(cfg, "num_key_value_heads", a)
    if not cfg.get("head_dim") and h % a:  # transformers' validate_architecture rejects it too
        raise MemplanError(f"hidden_size ({h}) is not a multiple of num_attention_heads ({a}) and no head_dim is given")
    d = cfg.get("head_dim") or h // a
    d = _int({"head_dim": d}, "head_dim")
    if a % kv:
        raise MemplanError(f"num_attention_heads ({a}) is not a multiple of num_key_value_heads ({kv})")
    return h, a, kv, d


def _qkvo(h, a, kv, d, qkv_bias=False, o_bias=False) -> tuple[Linear, ...]:
    return (
        Linear("q_proj", h, a * d, qkv_bias),
        Linear("k_proj", h, kv * d, qkv_bias),
        Linear("v_proj", h, kv * d, qkv_bias),
        Linear("o_proj", a * d, h, o_bias),
    )


def _gated_mlp(h, i, bias=False) -> tuple[Linear, ...]:
    return (Linear("gate_proj", h, i, bias), Linear("up_proj", h, i, bias), Linear("down_proj", i, h, bias))


def _spec(cfg, name, source, h, a, kv, d, layers, embedding, lm_head, other, tied, other_linears=()):
    return ModelSpec(
        name=name, model_type=cfg["model_type"], source=source, hidden_size=h, num_heads=a, num_kv_heads=kv,
        head_dim=d, vocab_size=cfg["vocab_size"], layers=tuple(layers), embedding_params=embedding,
        lm_head_params=0 if tied else lm_head, other_params=other, other_linears=tuple(other_linears),
        tie_word_embeddings=tied, hf_config=dict(cfg),
    )


def _llama_like(cfg, name, source, *, qkv_bias=False, o_bias=False, mlp_bias=False, norms=2, qk_norm=False,
                tied_default=False):
    """llama, mistral, qwen2, qwen3, gemma, gemma2 (modeling_llama.py and its copies)."""
    h, a, kv, d = _attention(cfg)
    i = _int(cfg, "intermediate_size")
    v = _int(cfg, "vocab_size")
    layer = LayerSpec(
        linears=_qkvo(h, a, kv, d, qkv_bias, o_bias) + _gated_mlp(h, i, mlp_bias),
        norm_params=norms * h + (2 * d if qk_norm else 0),
        qk_norm=qk_norm,
    )
    tied = _flag(cfg, "tie_word_embeddings", tied_default)
    return _spec(cfg, name, source, h, a, kv, d, [(_int(cfg, "num_hidden_layers"), layer)], v * h, v * h, h, tied)


def llama(cfg, name, source):
    return _llama_like(cfg, name, source, qkv_bias=_flag(cfg, "attention_bias", False),
                       o_bias=_flag(cfg, "attention_bias", False), mlp_bias=_flag(cfg, "mlp_bias", False))


def mistral(cfg, name, source):
    return _llama_like(cfg, name, source)


def qwen2(cfg, name, source):  # modeling_qwen2.py: q/k/v carry a bias, o_proj does not
    return _llama_like(cfg, name, source, qkv_bias=True)


def qwen3(cfg, name, source):  # modeling_qwen3.py: q_norm/k_norm over head_dim
    b = _flag(cfg, "attention_bias", False)
    return _llama_like(cfg, name, source, qkv_bias=b, o_bias=b, qk_norm=True)


def gemma(cfg, name, source):
    return _llama_like(cfg, name, source, tied_default=True)


def gemma2(cfg, name, source):  # modeling_gemma2.py: pre/post attention and pre/post feed-forward norms
    b = _flag(cfg, "attention_bias", False)
    return _llama_like(cfg, name, source, qkv_bias=b, o_bias=b, norms=4, tied_default=True)


def phi3(cfg, name, source):  # modeling_phi3.py: fused qkv_proj and gate_up_proj
    h, a, kv, d = _attention(cfg)
    i = _int(cfg, "intermediate_size")
    v = _int(cfg, "vocab_size")
    layer = LayerSpec(
        linears=(Linear("qkv_proj", h, (a + 2 * kv) * d), Linear("o_proj", a * d, h),
                 Linear("gate_up_proj", h, 2 * i), Linear("down_proj", i, h)),
        norm_params=2 * h,
    )
    tied = _flag(cfg, "tie_word_embeddings", False)
    return _spec(cfg, name, source, h, a, kv, d, [(_int(cfg, "num_hidden_layers"), layer)], v * h, v * h, h, tied)


def _moe_layer(cfg, h, a, kv, d, *, experts, top_k, moe_i, qkv_bias, qk_norm, shared_i=0) -> LayerSpec:
    b = qkv_bias
    linears = _qkvo(h, a, kv, d, b, False)
    if shared_i:  # modeling_qwen2_moe.py: a dense shared expert (nn.Linear) and its sigmoid gate Linear(h, 1)
        linears += _gated_mlp(h, shared_i) + (Linear("shared_expert_gate", h, 1),)
    return LayerSpec(
        linears=linears, norm_params=2 * h + (2 * d if qk_norm else 0), qk_norm=qk_norm,
        expert_params=experts * (2 * moe_i * h + h * moe_i), router_params=experts * h,
        num_experts=experts, experts_per_token=top_k, expert_intermediate=moe_i, mlp="moe",
    )


def mixtral(cfg, name, source):  # modeling_mixtral.py
    h, a, kv, d = _attention(cfg)
    v = _int(cfg, "vocab_size")
    layer = _moe_layer(cfg, h, a, kv, d, experts=_int(cfg, "num_local_experts"), top_k=_int(cfg, "num_experts_per_tok"),
                       moe_i=_int(cfg, "intermediate_size"), qkv_bias=False, qk_norm=False)
    tied = _flag(cfg, "tie_word_embeddings", False)
    return _spec(cfg, name, source, h, a, kv, d, [(_int(cfg, "num_hidden_layers"), layer)], v * h, v * h, h, tied)


def _qwen_moe(cfg, name, source, *, qwen3_style: bool):
    """qwen2_moe / qwen3_moe: layer i is sparse unless i is in mlp_only_layers or (i+1) % decoder_sparse_step."""
    h, a, kv, d = _attention(cfg)
    v = _int(cfg, "vocab_size")
    n = _int(cfg, "num_hidden_layers")
    qkv_bias = _flag(cfg, "attention_bias", False) if qwen3_style else _flag(cfg, "qkv_bias", True)
    moe = _moe_layer(cfg, h, a, kv, d, experts=_int(cfg, "num_experts"), top_k=_int(cfg, "num_experts_per_tok"),
                     moe_i=_int(cfg, "moe_intermediate_size"), qkv_bias=qkv_bias, qk_norm=qwen3_style,
                     shared_i=0 if qwen3_style else _int(cfg, "shared_expert_intermediate_size"))
    dense = LayerSpec(linears=_qkvo(h, a, kv, d, qkv_bias, False) + _gated_mlp(h, _int(cfg, "intermediate_size")),
                      norm_params=2 * h + (2 * d if qwen3_style else 0), qk_norm=qwen3_style)
    step = _int(cfg, "decoder_sparse_step", 1)
    dense_only = set(cfg.get("mlp_only_layers") or [])
    kinds = [moe if (i not in dense_only and (i + 1) % step == 0) else dense for i in range(n)]
    groups: list[list] = []
    for kind in kinds:  # run-length encode identical consecutive layers
        if groups and groups[-1][1] is kind:
            groups[-1][0] += 1
        else:
            groups.append([1, kind])
    tied = _flag(cfg, "tie_word_embeddings", False)
    return _spec(cfg, name, source, h, a, kv, d, [tuple(g) for g in groups], v * h, v * h, h, tied)


def qwen2_moe(cfg, name, source):
    return _qwen_moe(cfg, name, source, qwen3_style=False)


def qwen3_moe(cfg, name, source):
    return _qwen_moe(cfg, name, source, qwen3_style=True)


def falcon(cfg, name, source):
    """modeling_falcon.py. Its linears are FalconLinear (a subclass of nn.Linear): bitsandbytes leaves them
    unquantized, PEFT still wraps them with LoRA."""
    h = _int(cfg, "hidden_size")
    a = _int(cfg, "num_attention_heads")
    v = _int(cfg, "vocab_size")
    d = h // a
    new_arch = _flag(cfg, "new_decoder_architecture", False)
    multi_query = _flag(cfg, "multi_query", True)
    kv = _int(cfg, "num_kv_heads", a) if (new_arch or not multi_query) else 1
    qkv_out = (2 * kv + a) * d if new_arch else (h + 2 * d if multi_query else 3 * h)
    i = cfg.get("ffn_hidden_size") or 4 * h
    bias = _flag(cfg, "bias", False)
    parallel = _flag(cfg, "parallel_attn", True)
    n_ln = cfg.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
    norms = 2 if (not parallel or n_ln == 2) else 1
    linears = tuple(Linear(nm, i_, o_, bias, quantizable=False) for nm, i_, o_ in (
        ("query_key_value", h, qkv_out), ("dense", h, h), ("dense_h_to_4h", h, i), ("dense_4h_to_h", i, h)))
    layer = LayerSpec(linears=linears, norm_params=norms * 2 * h, mlp="plain", parallel_attn=parallel)
    tied = _flag(cfg, "tie_word_embeddings", True)
    return _spec(cfg, name, source, h, a, kv, d, [(_int(cfg, "num_hidden_layers"), layer)], v * h, v * h, 2 * h, tied)


def gpt_neox(cfg, name, source):  # modeling_gpt_neox.py
    h = _int(cfg, "hidden_size")
    a = _int(cfg, "num_attention_heads")
    i = _int(cfg, "intermediate_size")
    v = _int(cfg, "vocab_size")
    ab = _flag(cfg, "attention_bias", True)
    layer = LayerSpec(
        linears=(Linear("query_key_value", h, 3 * h, ab), Linear("dense", h, h, ab),
                 Linear("dense_h_to_4h", h, i, True), Linear("dense_4h_to_h", i, h, True)),
        norm_params=2 * 2 * h, mlp="plain", parallel_attn=_flag(cfg, "use_parallel_residual", True),
    )
    tied = _flag(cfg, "tie_word_embeddings", False)
    return _spec(cfg, name, source, h, a, a, h // a, [(_int(cfg, "num_hidden_layers"), layer)], v * h, v * h,
                 2 * h, tied)


def opt(cfg, name, source):  # modeling_opt.py: learned positions (+2 offset), optional project_in/out
    h = _int(cfg, "hidden_size")
    a = _int(cfg, "num_attention_heads")
    v = _int(cfg, "vocab_size")
    f = _int(cfg, "ffn_dim")
    p = _int(cfg, "word_embed_proj_dim", h)
    b = _flag(cfg, "enable_bias", True)
    ln = 2 * h if _flag(cfg, "layer_norm_elementwise_affine", True) else 0
    layer = LayerSpec(
        linears=(Linear("q_proj", h, h, b), Linear("k_proj", h, h, b), Linear("v_proj", h, h, b),
                 Linear("out_proj", h, h, b), Linear("fc1", h, f, b), Linear("fc2", f, h, b)),
        norm_params=2 * ln, mlp="plain",
    )
    final_ln = ln if (_flag(cfg, "do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm")) else 0
    projections = (Linear("project_out", h, p), Linear("project_in", p, h)) if p != h else ()
    embedding = v * p + (_int(cfg, "max_position_embeddings") + 2) * h
    tied = _flag(cfg, "tie_word_embeddings", True)
    return _spec(cfg, name, source, h, a, a, h // a, [(_int(cfg, "num_hidden_layers"), layer)], embedding, v * p,
                 final_ln, tied, projections)


BUILDERS = {
    "llama": llama, "mistral": mistral, "mixtral": mixtral, "qwen2": qwen2, "qwen2_moe": qwen2_moe,
    "qwen3": qwen3, "qwen3_moe": qwen3_moe, "gemma": gemma, "gemma2": gemma2, "phi3": phi3,
    "falcon": falcon, "gpt_neox": gpt_neox, "opt": opt,
}


def from_hf_config(cfg: dict, name: str, source: str) -> ModelSpec:
    """Normalize a config.json dict. Raises MemplanError naming the missing or bad field."""
    if not isinstance(cfg, dict):
        raise MemplanError(f"{source}: a config must be a JSON object")
    model_type = cfg.get("model_type")
    if model_type is None:
        raise MemplanError(f"{source}: config is missing the field 'model_type'")
    if model_type not in BUILDERS:  # any other architecture transformers builds: read off its meta model
        from memplan.catalog.hfconfig import causal_lm_class
        from memplan.derive import derived_spec

        if causal_lm_class(model_type) is None:
            raise MemplanError(f"{source}: model_type {model_type!r} exists only as the model's remote code, which "
                               f"memplan never runs, and has no hand-written builder; supported without remote "
                               f"code: every causal LM transformers builds")

        return derived_spec(cfg, name, source)
    try:
        for key in _REQUIRED.get(model_type, _REQUIRED["default"]):
            _int(cfg, key)
        return BUILDERS[model_type](cfg, name, source)
    except MemplanError as e:
        raise MemplanError(f"{source}: {e}") from None
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:  # a field of the wrong type or shape
        raise MemplanError(f"{source}: malformed {model_type} config ({e.__class__.__name__}: {e})") from None
