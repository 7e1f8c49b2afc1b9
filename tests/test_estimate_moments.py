"""Estimator mechanisms found on the seeded random sample (seed 8317, issue #11), each checked against the meta trace
of a tiny model: a frozen first layer, eager attention's moments, a plain MLP's activation backward and a
checkpointed MoE layer's recompute. `before` in each comment is the error of the estimate that lacked it."""
from __future__ import annotations

import logging

import pytest

from memplan.architectures import from_hf_config
from memplan.spec import TrainSpec

TINY_LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 2,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 500,
              "max_position_embeddings": 4096, "tie_word_embeddings": False}
TINY_PHI3 = {**TINY_LLAMA, "model_type": "phi3", "num_key_value_heads": 8, "sliding_window": None, "pad_token_id": 0}
TINY_NEOX = {"model_type": "gpt_neox", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
             "num_attention_heads": 8, "vocab_size": 500, "hidden_act": "gelu_fast", "rotary_pct": 0.25,
             "use_parallel_residual": True, "max_position_embeddings": 4096, "tie_word_embeddings": False}
_MOE = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_experts": 8,
        "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 8, "vocab_size": 500,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": []}
TINY_QWEN3_MOE = {**_MOE, "model_type": "qwen3_moe", "num_key_value_heads": 2, "head_dim": 32}
TINY_QWEN2_MOE = {**_MOE, "model_type": "qwen2_moe", "num_key_value_heads": 8, "shared_expert_intermediate_size": 512}
TINY_FALCON40 = {"model_type": "falcon", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8,
                 "num_kv_heads": 2, "new_decoder_architecture": True, "parallel_attn": True, "bias": False,
                 "vocab_size": 500, "max_position_embeddings": 4096, "alibi": False}
TINY_FALCON7 = {"model_type": "falcon", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8,
                "multi_query": True, "new_decoder_architecture": False, "parallel_attn": True, "bias": False,
                "vocab_size": 500, "max_position_embeddings": 4096, "alibi": False}
_FUSED = {"seq_len": 512, "batch_size": 2, "gradient_checkpointing": False, "optimizer": "sgd", "loss": "liger"}


def test_first_input_frozen_only_without_checkpointing_or_a_trained_embedding():
    from memplan.estimate.activations import first_input_frozen

    m = from_hf_config(TINY_LLAMA, "tiny", "test")
    assert first_input_frozen(m, TrainSpec(gradient_checkpointing=False))
    assert not first_input_frozen(m, TrainSpec(gradient_checkpointing=True))  # enable_input_require_grads
    assert not first_input_frozen(m, TrainSpec(gradient_checkpointing=False, modules_to_save=("embed_tokens",)))
    assert not first_input_frozen(m, TrainSpec(gradient_checkpointing=False, method="full", bits=16))


torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
logging.disable(logging.WARNING)


@pytest.mark.parametrize("cfg,train,tol", [
    # layer 0's input needs no grad without checkpointing: a frozen qkv feeds an attention core that saves nothing
    # (its fp32 probabilities above all); only o_proj's adapter saves (before: +40%)
    (TINY_LLAMA, TrainSpec(seq_len=512, bits=4, compute_dtype="fp32", upcast=False, attention="eager",
                           gradient_checkpointing=False, lora_targets=("o_proj",)), 0.005),
    # ... GPT-NeoX: the parallel MLP runs on a norm of that input, frozen too (before: +42%)
    (TINY_NEOX, TrainSpec(seq_len=256, batch_size=2, bits=32, dora=True, lora_dropout=0.0, lora_dtype="fp32",
                          gradient_checkpointing=False, lora_targets=("dense",), optimizer="sgd"), 0.005),
    # Phi-3's fused qkv: probs @ v saves the matmul's copy of v, not the fused output; eager's peak is softmax's
    # backward, without the q/k/v working set or a dequantized weight; the 4-D mask dies with the forward
    # (before: +52%)
    (TINY_PHI3, TrainSpec(seq_len=512, bits=4, compute_dtype="fp32", upcast=False, attention="eager",
                          gradient_checkpointing=False, lora_targets=("o_proj",)), 0.005),
    # a plain MLP's GELU backward: two i-wide gradients, and the attention branch's 16-bit gradient waiting
    # (before: -7.2%)
    (TINY_NEOX | {"hidden_act": "gelu"}, TrainSpec(seq_len=512, bits=4, attention="flash_attention_2",
                                                  gradient_checkpointing=False, lora_targets="qv", lora_dropout=0.0,
                                                  modules_to_save=("embed_in",), optimizer="sgd"), 0.01),
    # ... gelu_fast's chain: three i-wide, also after a checkpointed layer's recompute (before: -10.6%)
    (TINY_NEOX, TrainSpec(seq_len=512, bits=4, lora_targets="qv", optimizer="sgd"), 0.01),
    # a checkpointed MoE layer's recompute through the grouped_mm experts: Qwen3-MoE stops at inv_perm with the
    # experts' output gradient made (before: -6.9%) ...
    (TINY_QWEN3_MOE, TrainSpec(seq_len=1024, bits=16, lora_targets="attn", lora_dtype="fp32", optimizer="sgd",
                               loss="liger"), 0.005),
    # ... Qwen2-MoE's shared-expert gate saves after the experts: their permuted copy instead (before: -7.9%)
    (TINY_QWEN2_MOE, TrainSpec(seq_len=1024, bits=16, lora_targets="qv", dora=True, lora_dtype="fp16",
                               optimizer="sgd", loss="liger", attention="flash_attention_2"), 0.005),
    # seed 6719 (issue #11, a fused loss leaves no b·s·V logits, so layer moments become the peaks):
    # the forward at the last layer's LoRA down_proj: its fp32 input copy, lora_B's output and its scaled copy
    # beside every saved set and the frames' locals (moments.mlp_out_forward; before: -9.0%)
    (TINY_LLAMA, TrainSpec(bits=16, lora_targets="all-linear", lora_dtype="fp32", lora_dropout=0.1, **_FUSED), 0.005),
    # the final RMSNorm's fp32 backward chain, five H-wide fp32 gradients (before: -7.3%)
    (TINY_LLAMA, TrainSpec(bits=16, lora_targets=("q_proj",), lora_dtype="bf16", lora_dropout=0.0, **_FUSED), 0.005),
    # the gated product's backward without checkpointing: d up beside d act(gate) and dp (before: -7.8%)
    (TINY_LLAMA, TrainSpec(bits=4, lora_targets=("q_proj",), lora_dropout=0.0, **_FUSED), 0.005),
    # LLM.int8's backward dequantizes CB to its fp32 input's dtype (MatMul8bitLt ctx.dtype_A; before: -6.1%)
    (TINY_NEOX, TrainSpec(bits=8, lora_targets="qv", lora_dropout=0.0, **{**_FUSED, "seq_len": 64, "batch_size": 1}),
     0.015),
    # a fused loss leaves the forward's peak inside the last layer, at its down_proj's LoRA add: the embedding's
    # output, the layer's input, the residual, the MLP's input, the product and its fp32 cast beside the add's
    # three outputs (moments.mlp_out_forward; before: -6.6%, -5.1%, -4.5%)
    (TINY_LLAMA, TrainSpec(seq_len=2048, bits=16, loss="cce", upcast=False, gradient_checkpointing=False), 0.005),
    (TINY_LLAMA, TrainSpec(seq_len=2048, bits=4, loss="liger", lora_dtype="bf16", gradient_checkpointing=False),
     0.005),
    (TINY_LLAMA, TrainSpec(seq_len=2048, bits=32, loss="liger", gradient_checkpointing=False), 0.005),
    # seed 88213 (issue #11): Falcon-7B's multi-query SDPA runs torch's math kernel, all fp32: its softmax backward
    # holds the gradient of the probabilities and its own output, two fp32 a·s² tensors beside the saved fp32
    # probabilities, in a 16-bit model too (moments.math_softmax_backward; before: -28%; the +2.2% left is the
    # recomputed layer's small tensors through coefficients.json's attention terms, +0.4% at Falcon-7B's widths)
    (TINY_FALCON7, TrainSpec(seq_len=1024, batch_size=2, bits=16, method="full", optimizer="sgd", loss="cce",
                             activation_offload="checkpoints", attention="sdpa"), 0.03),
    # a frozen 4-bit down_proj saves nothing (MatMul4Bit's ctx.tensors), so its backward makes dp before the
    # checkpointed layer's recompute, which reaches up_proj's DoRA with dp alive (dora._pre_recompute_grads;
    # seed 88213 #117; before: -5.9%)
    (TINY_LLAMA | {"model_type": "qwen3", "head_dim": 32},
     TrainSpec(seq_len=2048, batch_size=2, bits=4, compute_dtype="fp16", upcast=False, lora_dtype="bf16",
               lora_targets=("q_proj", "v_proj", "o_proj", "up_proj"), dora=True, attention="flash_attention_2",
               loss="cce", optimizer="sgd"), 0.005),
    # a plain MLP's activation backward comes after the down projection's, which released its input (saved for
    # its weight's gradient) and made that gradient (moments.plain_act_backward; seed 88213 #68; before: +4.1%)
    (TINY_NEOX, TrainSpec(seq_len=2048, batch_size=2, bits=16, method="full", loss="cce", optimizer="sgd",
                          attention="sdpa", gradient_checkpointing=False), 0.005),
    # a checkpointed plain MLP with frozen bitsandbytes linears (ctx.tensors, nothing to unpack): the down
    # projection's backward dequantizes before the recompute, the up projection's after the activation's backward
    # released the MLP's recomputed set (fresh seed 131337 #24; before: +13.5% 8-bit, +20.7% 4-bit)
    (TINY_NEOX | {"hidden_size": 1024, "intermediate_size": 4096},
     TrainSpec(seq_len=32, batch_size=2, bits=8, lora_targets="qv", lora_dtype="bf16", optimizer="sgd", loss="liger",
               activation_offload="checkpoints"), 0.01),
    (TINY_NEOX | {"hidden_size": 1024, "intermediate_size": 4096},
     TrainSpec(seq_len=32, batch_size=2, bits=4, lora_targets="qv", lora_dtype="bf16", optimizer="sgd", loss="liger",
               activation_offload="checkpoints"), 0.01),
], ids=["first-layer-eager", "first-layer-neox-dora", "phi3-eager-fused-v", "neox-gelu", "neox-gelu-fast-ckpt",
        "qwen3-moe-recompute", "qwen2-moe-recompute", "fused-loss-last-down-proj", "fused-loss-final-norm-backward",
        "fused-loss-product-backward", "fused-loss-int8-dequant", "fused-loss-forward-16bit",
        "fused-loss-forward-4bit", "fused-loss-forward-32bit", "falcon7-math-softmax-backward",
        "dora-recompute-frozen-4bit-down", "plain-mlp-act-backward-full",
        "frozen-int8-plain-mlp-recompute", "frozen-nf4-plain-mlp-recompute"])
def test_estimate_moment_against_the_trace(cfg, train, tol):
    from memplan.estimate import estimate
    from memplan.trace import run_trace

    m = from_hf_config(cfg, "tiny", "test")
    t = run_trace(m, train, keep_timeline=False, steps=1, warm_optimizer=True)
    e = estimate(m, train)
    err = (e.peak_bytes - t.peak_bytes) / t.peak_bytes
    assert abs(err) <= tol, (err, t.peak_phase, t.components, e.peak_phase, e.components)


def test_falcon40_first_layer_frozen_v_and_mlp_out_forward():
    """Falcon-40B's broadcast v is frozen in a first layer whose input needs no grad, so its attention core saves
    nothing (before: forward +12.5%); the forward peaks at the last layer's LoRA dense_4h_to_h with the decoder
    layer's attention_layernorm_out still alive (moments.mlp_out_forward)."""
    from memplan.estimate import estimate
    from memplan.trace import run_trace

    m = from_hf_config(TINY_FALCON40, "tiny", "test")
    train = TrainSpec(bits=32, lora_targets=("dense", "dense_h_to_4h", "dense_4h_to_h"), lora_dtype="bf16",
                      lora_dropout=0.0, attention="sdpa", **_FUSED)
    t = run_trace(m, train, keep_timeline=False, steps=1, warm_optimizer=True)
    e = estimate(m, train)
    err = (e.phases["forward"] - t.phases["forward"]) / t.phases["forward"]
    assert abs(err) <= 0.01, (err, e.phases, t.phases)


@pytest.mark.parametrize("cfg,train,phase,tol", [
    # Liger's SiLU-mul backward writes da and db into its saved inputs: dp and the output's gradient, nothing more
    # (moments.mlp_product_backward; before: +26%)
    (TINY_LLAMA, TrainSpec(bits=16, seq_len=1024, batch_size=2, lora_targets="qv", lora_dtype="bf16", lora_dropout=0.0,
                           loss="cce", liger=True, optimizer="sgd"), "backward", 0.01),
    # Liger's Phi-3 MLP under offload all: the gate_up moment holds none of Liger's extras, down_proj's holds its own
    # dequantized weight (moments.down_forward; before: +8.8%) ...
    (TINY_PHI3, TrainSpec(bits=4, seq_len=512, batch_size=2, upcast=False, lora_targets="attn", lora_dtype="bf16",
                          gradient_checkpointing=False, activation_offload="all", loss="cce", liger=True,
                          optimizer="sgd"), "forward", 0.01),
    # ... and two contiguous halves saved, two tensors brought back for its backward (before: +18.3%)
    (TINY_PHI3, TrainSpec(bits=4, seq_len=512, batch_size=2, upcast=False, lora_targets="attn", lora_dtype="bf16",
                          gradient_checkpointing=False, activation_offload="all", loss="cce", liger=True,
                          optimizer="sgd"), "backward", 0.015),
], ids=["liger-swiglu-backward", "liger-phi3-down-forward", "liger-phi3-halves-backward"])
def test_liger_moments_against_the_trace(cfg, train, phase, tol):
    """Liger's kernels (issue #11, seed 88213 draws 100 and 205: +13.8% and +5.5% before), the estimate's phase
    against the meta trace's, which runs memplan/trace/liger.py's models of liger-kernel 0.8.5."""
    from memplan.estimate import estimate
    from memplan.trace import run_trace

    m = from_hf_config(cfg, "tiny", "test")
    t = run_trace(m, train, keep_timeline=False)
    e = estimate(m, train)
    err = e.phases[phase] / t.phases[phase] - 1
    assert abs(err) <= tol, (err, e.phases, t.phases)


def test_liger_gated_mul_backward_in_place():
    """Liger's SiLU-mul backward stores da and db into its saved a and b (ops/swiglu.py swiglu_backward): the gated
    product's backward holds dp and the residual gradient only, not MulBackward0's three i-wide tensors
    (moments.mlp_product_backward; seed 88213 #6; before: backward +15.7%)."""
    from memplan.estimate import estimate
    from memplan.trace import run_trace

    m = from_hf_config(TINY_LLAMA, "tiny", "test")
    train = TrainSpec(seq_len=2048, batch_size=2, bits=4, lora_dropout=0.0, liger=True, gradient_checkpointing=False,
                      lora_targets=("q_proj", "v_proj", "gate_proj", "up_proj"), loss="liger", optimizer="sgd")
    t = run_trace(m, train, keep_timeline=False, steps=1, warm_optimizer=True)
    e = estimate(m, train)
    err = (e.phases["backward"] - t.phases["backward"]) / t.phases["backward"]
    assert abs(err) <= 0.025, (err, e.phases, t.phases)


def test_int8_forward_makes_no_weight_sized_copy():
    """bitsandbytes' LLM.int8 forward multiplies int8 activations by the int8 weight (MatMul8bitLt.forward,
    int8_mixed_scaled_mm): unlike NF4's, it dequantizes no weight-sized copy; its backward does (fresh seed 131337
    #24, GPT-NeoX-20B 8-bit; tiny GPT-NeoX forward before: +42.6%)."""
    from memplan.estimate import estimate
    from memplan.trace import run_trace

    m = from_hf_config(TINY_NEOX | {"hidden_size": 1024, "intermediate_size": 4096, "hidden_act": "gelu"}, "tiny",
                       "test")
    train = TrainSpec(seq_len=32, batch_size=2, bits=8, lora_targets="qv", lora_dtype="bf16", optimizer="sgd",
                      loss="liger", activation_offload="checkpoints")
    t = run_trace(m, train, keep_timeline=False, steps=1, warm_optimizer=True)
    e = estimate(m, train)
    err = (e.phases["forward"] - t.phases["forward"]) / t.phases["forward"]
    assert abs(err) <= 0.04, (err, e.phases, t.phases)


@pytest.mark.parametrize("bits,offload,liger", [(8, "all", True), (4, "off", False)], ids=["int8-offload-all-liger",
                                                                                           "nf4-standard-mlp"])
def test_checkpointed_up_proj_lora_add_forward(bits, offload, liger):
    """A checkpointed gated MLP whose up_proj is a LoRA target peaks in the last layer's forward at up_proj's add:
    act(gate) (Liger: the gate) beside the base output, the LoRA output cast to fp32 and their sum, four i-wide; under
    offload all TRL's forward stash still holds the last layers' inputs (moments._up_add, _ckpt_input_stash; fresh
    seed 131337 draw 26, Llama-3-8B 8-bit; before: forward -33% / -37% here)."""
    from memplan.estimate import estimate
    from memplan.trace import run_trace

    m = from_hf_config(TINY_LLAMA, "tiny", "test")
    train = TrainSpec(bits=bits, compute_dtype="fp32", upcast=False, seq_len=512, batch_size=2, lora_dropout=0.0,
                      lora_targets=("q_proj", "k_proj", "o_proj", "up_proj"), lora_dtype="bf16", optimizer="sgd",
                      gradient_checkpointing=True, activation_offload=offload, loss="liger", liger=liger)
    t = run_trace(m, train, keep_timeline=False, steps=1, warm_optimizer=True)
    e = estimate(m, train)
    err = e.phases["forward"] / t.phases["forward"] - 1
    assert abs(err) <= 0.01, (err, e.phases, t.phases)


def test_checkpointed_int8_recompute_at_up_proj_add():
    """The last layer's recompute at up_proj's LoRA add holds the gate (Liger's SiLU-mul argument) and the rerun's
    LLM.int8 inputs (MatMul8bitLt's ctx.tensors, outside the saved set) beside the add (recompute.lora_add; fresh
    seed 131337 draw 26: -7.4% -> -3.5%; before: -12.6% here). What is still missing (about 5% here): not yet
    explained, so the bound is one-sided below."""
    from memplan.estimate import estimate
    from memplan.trace import run_trace

    m = from_hf_config(TINY_LLAMA, "tiny", "test")
    train = TrainSpec(bits=8, compute_dtype="fp32", upcast=False, seq_len=512, batch_size=2, lora_dropout=0.0,
                      lora_targets=("q_proj", "k_proj", "o_proj", "up_proj"), lora_dtype="bf16", optimizer="sgd",
                      gradient_checkpointing=True, loss="liger", liger=True)
    t = run_trace(m, train, keep_timeline=False, steps=1, warm_optimizer=True)
    e = estimate(m, train)
    err = e.phases["backward"] / t.phases["backward"] - 1
    assert -0.055 <= err <= 0.01, (err, e.phases, t.phases)
