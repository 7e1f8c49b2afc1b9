"""A ModelSpec read off the model transformers builds on the meta device (torch; no memory, no download).

For a model_type without a hand-written builder (memplan/architectures.py): build AutoModelForCausalLM from the
config on meta, find the decoder layers (the longest nn.ModuleList), and record per layer every nn.Linear (name,
shape, bias; quantizable when its type *is* nn.Linear, as transformers' replace_with_bnb_linear decides), the MoE
expert tensors (parameters of 3 or more dimensions, or under an `experts` module: transformers 5 fuses them), the
router, and the rest (norms, per-head scales) as norm parameters. Outside the layers: embeddings, the output layer
(0 when tied), other linears and the rest. Consecutive identical layers are grouped, so counts stay exact.
"""
from __future__ import annotations

import copy
import warnings

from memplan.errors import MemplanError
from memplan.spec import LayerSpec, Linear, ModelSpec


def build_meta(cfg: dict, num_layers: int | None = None):
    """AutoModelForCausalLM of this config on meta (num_layers: a truncated copy, for the activation fits)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    kwargs = copy.deepcopy({k: v for k, v in cfg.items() if k != "model_type"})  # transformers edits nested dicts
    if num_layers is not None:
        kwargs = truncated(kwargs, num_layers)
    try:
        config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a config it cannot build
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise MemplanError(f"transformers cannot build model_type {cfg['model_type']!r} from this config "
                           f"({e.__class__.__name__}: {first})") from None


def truncated(cfg: dict, num_layers: int) -> dict:
    """The config with its first num_layers layers: per-layer lists (layer_types, mlp_only_layers ...) cut too."""
    out = copy.deepcopy(dict(cfg, num_hidden_layers=num_layers))
    full = cfg.get("num_hidden_layers")
    for key, value in cfg.items():
        if isinstance(value, list) and full and len(value) == full and key not in ("eos_token_id",):
            out[key] = value[:num_layers]
    return out


def _layers(model):
    import torch

    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None or not len(best[1]):
        raise MemplanError("cannot find the decoder layers (no nn.ModuleList) in the model transformers builds")
    return best


def _layer_spec(layer, cfg: dict) -> LayerSpec:
    import torch

    linears, seen = [], set()
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            linears.append(Linear(name.split(".")[-1], mod.in_features, mod.out_features, mod.bias is not None,
                                  quantizable=type(mod) is torch.nn.Linear))
            seen.update(id(p) for p in mod.parameters(recurse=False))
    expert = router = norm = 0
    for name, p in layer.named_parameters():
        if id(p) in seen:
            continue
        parts = name.split(".")
        if p.dim() >= 3 or "experts" in parts[:-1]:
            expert += p.numel()
        elif parts[-2:-1] and parts[-2] in ("gate", "router") or parts[-1] == "e_score_correction_bias":
            router += p.numel()
        else:
            norm += p.numel()
    n_exp = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0
    moe = expert > 0
    return LayerSpec(
        linears=tuple(linears), norm_params=norm, expert_params=expert, router_params=router,
        num_experts=n_exp if moe else 0, experts_per_token=(cfg.get("num_experts_per_tok") or 0) if moe else 0,
        expert_intermediate=(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0) if moe else 0,
        mlp="moe" if moe else "gated",
    )


def spec_from_model(model, cfg: dict, name: str, source: str) -> ModelSpec:
    import torch

    layers_name, layers = _layers(model)
    groups: list[list] = []
    for layer in layers:
        spec = _layer_spec(layer, cfg)
        if groups and groups[-1][1] == spec:
            groups[-1][0] += 1
        else:
            groups.append([1, spec])
    in_layers = {id(p) for p in layers.parameters()}
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    lm_head = {id(p) for p in out_emb.parameters()} if out_emb is not None and not tied else set()
    embedding = other = 0
    other_linears = []
    handled = set(in_layers) | lm_head
    for mod_name, mod in model.named_modules():
        if mod_name == layers_name or mod_name.startswith(layers_name + "."):
            continue
        if isinstance(mod, torch.nn.Embedding):
            embedding += sum(p.numel() for p in mod.parameters(recurse=False) if id(p) not in handled)
            handled.update(id(p) for p in mod.parameters(recurse=False))
        elif isinstance(mod, torch.nn.Linear) and mod is not out_emb:
            other_linears.append(Linear(mod_name.split(".")[-1], mod.in_features, mod.out_features,
                                        mod.bias is not None, quantizable=type(mod) is torch.nn.Linear))
            handled.update(id(p) for p in mod.parameters(recurse=False))
    seen_other = set()
    for p in model.parameters():
        if id(p) not in handled and id(p) not in seen_other:
            seen_other.add(id(p))
            other += p.numel()
    lm_params = 0 if tied or out_emb is None else sum(p.numel() for p in out_emb.parameters())
    h = cfg.get("hidden_size") or in_emb.embedding_dim
    a = cfg.get("num_attention_heads") or 1
    kv = cfg.get("num_key_value_heads") or a
    d = cfg.get("head_dim") or h // a
    return ModelSpec(
        name=name, model_type=cfg["model_type"], source=source, hidden_size=h, num_heads=a, num_kv_heads=kv,
        head_dim=d, vocab_size=cfg.get("vocab_size") or in_emb.num_embeddings,
        layers=tuple((n, s) for n, s in groups), embedding_params=embedding, lm_head_params=lm_params,
        other_params=other, other_linears=tuple(other_linears), tie_word_embeddings=tied, hf_config=dict(cfg),
        derived=True,
    )
