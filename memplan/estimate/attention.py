"""Which attention runs for a configuration, and whether SDPA gets a mask: the choices activations.py walks.

transformers 5.24's attention interfaces (sdpa_attention.py, flash_attention.py, eager paths in each modeling file),
masking_utils.py; transformers 4.57.6 for --transformers 4; torch 2.13's SDPA kernel selection.
"""
from __future__ import annotations

from memplan.spec import ModelSpec, TrainSpec

FA2 = "flash_attention_2"
FUSED = ("sdpa", FA2)  # O(s) attention kernels: no b·a·s² scores


def softcapped(model: ModelSpec) -> bool:
    """Gemma-2 caps attention logits (attn_logit_softcapping, default 50.0): tanh(scores / cap) * cap."""
    return model.model_type == "gemma2" and bool(model.hf_config.get("attn_logit_softcapping", 50.0))


def softmax_in_dtype(model: ModelSpec) -> bool:
    """Falcon's eager attention (no ALiBi) takes the softmax in the activations' dtype:
    F.softmax(scores + mask, dim=-1, dtype=hidden_states.dtype) (transformers/models/falcon/modeling_falcon.py,
    FalconAttention.forward, 5.24); the other eager paths take it in fp32 and cast back."""
    return model.model_type == "falcon" and not model.hf_config.get("alibi", False)


# Model types that transformers 4.57.6 still masks with their own _update_causal_mask, which returns no mask for
# SDPA in training without an attention_mask (AttentionMaskConverter._ignore_causal_mask_sdpa).
_TF4_OWN_MASK = ("falcon", "opt", "qwen2_moe")


def sdpa_gets_a_mask(model: ModelSpec, seq_len: int, transformers: int = 5) -> bool:
    """SDPA runs causal without a mask unless the model passes one: Falcon always does
    (allow_is_causal_skip=False); sliding-window models (Mistral v0.1, Phi-3 mini-4k; Qwen with
    use_sliding_window) do once the sequence is longer than the window (transformers masking_utils).
    transformers 4.57.6: the batch carries no attention_mask, so masking_utils._preprocess_mask_arguments runs
    find_packed_sequence_indices on the position ids, which in 4.x always returns a tensor (5.x returns None when
    nothing is packed); create_causal_mask then sets allow_is_causal_skip=False and every layer gets a
    (b, 1, s, s) boolean mask: CUDA runs the memory-efficient kernel, and GQA goes through repeat_kv
    (sdpa_attention.use_gqa_in_sdpa needs attention_mask None)."""
    if transformers == 4:
        return model.model_type not in _TF4_OWN_MASK
    cfg = model.hf_config
    if model.model_type == "falcon":
        return True
    window = cfg.get("sliding_window")
    if model.model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window"):
        return False
    return bool(window) and seq_len >= window  # masking_utils: kv_length >= local_attention_size


def effective_attention(model: ModelSpec, train: TrainSpec) -> str:
    """The attention that runs. transformers implements Gemma-2's soft-capping only in its eager attention
    (flash-attn takes a softcap argument, so flash_attention_2 keeps it in the kernel).
    Falcon-7B's multi-query SDPA call passes one k/v head without enable_gqa, which torch 2.13's flash,
    memory-efficient and cuDNN kernels all reject (sdp_utils check_batch_size_and_num_heads_dense): CUDA runs
    the math kernel, which upcasts q, k, v to fp32 and keeps the fp32 softmax (b·a·s²·4 B)."""
    if train.attention == FA2:
        return FA2
    if softcapped(model):
        return "eager"
    cfg = model.hf_config
    if (train.attention == "sdpa" and model.model_type == "falcon" and cfg.get("multi_query", True)
            and not cfg.get("new_decoder_architecture")):
        return "math"
    return train.attention

