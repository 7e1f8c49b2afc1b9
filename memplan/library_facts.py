"""Facts about the training libraries, shared by the torch-free estimate and the trace's kernel models."""
from __future__ import annotations


def next_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def liger_chunk_size(tokens: int, vocab: int, hidden: int) -> int:
    """Liger's fused linear cross-entropy chunk (liger_kernel/ops/fused_linear_cross_entropy.py,
    fused_linear_cross_entropy_forward, chunk_mem_const=1): inc_factor = cdiv(V, H); rows per chunk =
    next_power_of_2(cdiv(b·s, inc_factor)), at most b·s."""
    inc = -(-vocab // hidden)
    return min(next_pow2(-(-tokens // inc)), tokens)


# model types whose RMSNorm and gated MLP liger-kernel 0.8.5 patches (transformers/monkey_patch.py
# apply_liger_kernel_to_*); --liger on is refused elsewhere
LIGER_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "phi3")

# LLM.int8's outlier columns are data-dependent (bitsandbytes backends/cuda/ops.py int8_vectorwise_quant: argwhere
# over the columns holding any |x| >= threshold, 6.0 by default). The meta trace states their number
# (trace/kernels.py int8_outliers_mode) and the estimate counts the same: Dettmers et al. 2022 (LLM.int8(), §4)
# find the emergent outliers of 6.7B+ models in about 6 hidden dimensions.
INT8_OUTLIER_COLUMNS = 6
