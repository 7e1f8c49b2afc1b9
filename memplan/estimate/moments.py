"""A layer's working sets at named moments of its forward and backward, per token: what is alive beside the saved
set (activations.py) when an op's backward (or forward) peaks. Each moment cites the code it follows; the meta
trace's live tensors are the check (tests/test_estimate_moments.py, tests/test_validate_random.py).
"""
from __future__ import annotations

from functools import lru_cache

from memplan.estimate import activations as act
from memplan.estimate import saved_set
from memplan.estimate.attention import softmax_in_dtype
from memplan.estimate.experts import linear_experts
from memplan.estimate.lora import is_target
from memplan.estimate.weights import unquantized_dtype_bytes
from memplan.spec import LayerSpec, ModelSpec, TrainSpec


def mlp_product_backward(model: ModelSpec, layer: LayerSpec, train: TrainSpec, sv: saved_set.Saved) -> tuple[int, int]:
    """A gated MLP's backward peaks at act(gate) * up's backward (MulBackward0), a moment the layer-start
    working set does not cover: down_proj's backward has already made the gradient of the product p (i wide),
    MulBackward0 is writing the gradient of act(gate) beside it, and under checkpointing the recomputed p itself
    is still alive (torch.utils.checkpoint's non-reentrant recompute stops early, in the pack hook of the last
    saved tensor, and the product it just made is only freed with that frame). A frozen down_proj (no LoRA on
    it: a partial target list) saves nothing, so its backward runs before anything triggers the recompute and
    all of this sits on top of the recomputed saved set. What down_proj's LoRA saved (dropout copy, mask,
    lora_A output; p itself when dropout is 0) is released by then. Per token: (released, working set).
    Source: torch/utils/checkpoint.py (_checkpoint_hook, _StopRecomputationError), the meta trace's live
    tensors at the peak (tests/test_validate_random.py holds the cases)."""
    if layer.mlp != "gated" or "mlp.prod" not in sv.size or "mlp.prod" in sv.nograd:
        return 0, 0
    down = next(lin for lin in layer.linears if lin.name == "down_proj")
    prod = sv.size["mlp.prod"]
    prod_saved = "mlp.prod" in sv.kept
    ckpt = train.gradient_checkpointing
    freed = sum(sv.size[n] for n in sv.kept if n.startswith(down.name + "."))
    if prod_saved and not ckpt:
        freed += prod
    if train.liger:  # LigerSiLUMulFunction / LigerGELUMulFunction.backward (liger-kernel 0.8.5 ops/swiglu.py,
        # geglu.py: swiglu_backward / geglu_backward): dc made contiguous (dp, from down_proj's backward), the kernel
        # stores da and db into the saved a and b and returns them: nothing beside dp and the residual stream's
        # gradient (seed 88213 #6, 8-bit gemma-7b: +4.9% with MulBackward0's set); checkpointed, the recomputed c went
        # with the recompute's frame (the meta trace's live tensors: Mistral 16-bit LoRA on q/v, draw 100 of seed
        # 88213, +4.2% with it; tests/test_estimate_moments.py liger-swiglu-backward: +26% -> +0.1%).
        # Offload all without checkpointing: the layer's saved set is on the host (nothing to free) and the product
        # down_proj saved, brought back for its backward, stays in TRL's bwd stash until the next node (this one)
        # finishes (offload.py; tiny Llama full fine-tuning: -4.2% without it)
        work = model.hidden_size * saved_set.Ctx.of(train, model).e + prod
        if ckpt and not prod_saved and train.quantized and down.quantizable:  # a frozen bitsandbytes down_proj
            # saves nothing through the hooks (MatMul4Bit / MatMul8bitLt keep ctx.tensors), so the recompute stops
            # in the SiLU-mul's own pack, and its product stays alive (the meta trace: fresh seed 127303 draw 59,
            # Qwen2.5-3B QLoRA: -13.3% without it; a 16-bit down_proj's saved weight stops it after: #100 above)
            work += prod
        if train.activation_offload == "all" and not ckpt:
            return 0, work + (prod if prod_saved else 0)
        return freed, work
    if train.activation_offload == "all" and not ckpt:  # the saved set is on the host: nothing comes off, and what
        # down_proj's backward brought back stays in TRL's bwd stash until this node finishes (fresh seed 121999
        # draw 1, Phi-3 full fine-tuning: -4.8% with the product freed)
        freed = 0
    # the layer output's gradient, dp, d act(gate)
    work = model.hidden_size * saved_set.Ctx.of(train, model).e + 2 * prod
    if ckpt and not prod_saved:
        work += prod
    elif not ckpt:  # MulBackward0 returns both factors' gradients at once: d up beside d act(gate) and dp (the
        # meta trace's live tensors, tiny Llama QLoRA on q_proj with a fused loss: before -7.8%)
        work += prod
    return freed, work


@lru_cache(maxsize=4096)
def plain_act_backward(model: ModelSpec, layer: LayerSpec, train: TrainSpec) -> int:
    """Per token: a plain MLP's backward at its activation, after the down projection's backward (whose
    dequantized weight is gone by then), with the saved set still whole: the gradient coming from the down
    projection (in the stream's dtype: Linear4bit's cast back has a ToCopyBackward) and the activation's input
    gradient, two i-wide tensors (GeluBackward0 / threshold_backward); a tanh-GELU chain
    (saved_set._TANH_GELU_SAVED) starts at its outer product `0.5 * x * (1 + tanh(...))`, whose MulBackward0
    makes two (three i-wide in all). Beside them the residual stream's gradient and, in a parallel-attention layer
    (GPT-NeoX: one add of both branches and the residual), the attention branch's gradient waiting in the compute
    dtype when flash-attention's output is 16-bit in an fp32 stream (AddBackward0 casts it). Sources: transformers
    activations.py 5.24 (FastGELU / NewGELU), modeling_gpt_neox.py GPTNeoXLayer.forward, the meta trace's live
    tensors.
    By then the down projection's nodes have run and released what they saved (counted in the saved set): its LoRA
    tensors and, trained (full fine-tuning) or read by lora_A (dropout 0), its input, the activation's output, which
    ReLU alone saves again (Falcon-40B full fine-tune, seed 88213 #68: +3.5% with them counted)."""
    if layer.mlp != "plain":
        return 0
    fn = model.hf_config.get("hidden_act") or model.hf_config.get("activation_function") or "silu"
    up = next(lin for lin in layer.linears if lin.name in ("dense_h_to_4h", "fc1"))
    ctx = saved_set.Ctx.of(train, model)
    e, h = ctx.e, model.hidden_size
    branch = h * ctx.c if layer.parallel_attn and ctx.attention == act.FA2 and e != ctx.c else 0
    sv = saved_set.layer_saved(model, layer, ctx)
    down = sv.marks[-1][0]
    released = sum(sv.size[n] for n in sv.kept if n.startswith(down.name + "."))
    released += sv.size["mlp.act"] if "mlp.act" in sv.kept and fn != "relu" else 0
    return h * e + branch + (3 if fn in saved_set._TANH_GELU_SAVED else 2) * up.out_features * e - released


def lora_sum_promoted(model: ModelSpec, train: TrainSpec) -> int:
    """PEFT's plain LoRA Linear (peft/tuners/lora/layer.py 0.21, Linear.forward; a 16/32-bit or unquantizable base)
    adds `result + lora_B(lora_A(x)) * scaling` in the two operands' promoted dtype before `.to(result dtype)`.
    bf16 + fp16 promotes to fp32, wider than both: the add holds the base output, the scaled LoRA output and a
    4-byte sum, 2 bytes per output element more than with matching dtypes, in the widest adapted linear. (The
    bitsandbytes LoRA layers cast the LoRA output to the result dtype before adding: bnb.py.) Per token."""
    if train.method != "lora" or train.dora or not _sum_promotes(train):
        return 0
    widths = [lin.out_features for _, layer in model.layers for lin in layer.linears
              if is_target(lin, train) and not (train.quantized and lin.quantizable)]
    return 2 * max(widths, default=0)


def _sum_promotes(train: TrainSpec) -> bool:
    """bf16 + fp16 operands: torch promotes their sum to fp32 (lora_sum_promoted)."""
    result = "fp32" if unquantized_dtype_bytes(train) == 4 else train.compute_dtype
    return {result, train.lora_dtype} == {"fp16", "bf16"}


def moe_tail(model: ModelSpec, layer: LayerSpec, train: TrainSpec) -> int:
    """The end of transformers 5's grouped_mm_experts_forward (integrations/moe.py, 5.24), per token: with S = tokens
    x top-k rows of hidden width, `weighted_out[inv_perm]` runs while the gathered input selected_hidden_states_g
    (a local until the function returns), the down projection's output (saved by the routing-weight mul; a local
    under checkpointing), weighted_out and its permuted copy are all alive. By then the layer has saved all but
    what follows its experts (Qwen2-MoE runs its shared expert first; only the shared gate's few bytes follow).
    0 off transformers 5 or without experts."""
    if not layer.num_experts or linear_experts(train):
        return 0
    k, h, e = layer.experts_per_token, model.hidden_size, saved_set.Ctx.of(train, model).e
    return (4 if train.gradient_checkpointing else 3) * k * h * e


def falcon_eager_forward(model: ModelSpec, train: TrainSpec, e: int) -> int:
    """Falcon's eager attention at its softmax, per token (modeling_falcon.py 5.24, FalconAttention.forward): the
    scores (q @ k^T, scaled in place), scores + mask, and the softmax output, all in the activations' dtype (3 a·s·e).
    FalconModel.forward keeps each block's return value (`outputs = block(...)`: output and attn_weights, the
    probabilities) until the next block returns, so under checkpointing, where nothing inside a layer is saved, the
    previous layer's probabilities are alive through this layer's forward too; without it they are saved anyway."""
    n = 3 + (1 if train.gradient_checkpointing and model.num_layers > 1 else 0)
    return n * model.num_heads * train.seq_len * e


def eager_softmax_backward(model: ModelSpec, train: TrainSpec, e: int) -> int:
    """Eager attention's backward peaks in softmax's backward (per token): the fp32 gradient of the
    probabilities (ToCopyBackward of the .to(q.dtype) cast, or the matmul's own gradient when the activations
    are fp32) and _softmax_backward_data's fp32 output, a*s*4 bytes each. By then probs @ v's backward has run,
    so the 16-bit copy of the probabilities it saved (a*s*e, counted in the saved set) is released: torch
    derivatives.yaml (_softmax: result; mm/bmm: self, mat2), checked on the meta trace's live tensors."""
    a, s = model.num_heads, train.seq_len
    if softmax_in_dtype(model):  # the gradient of the probabilities and softmax's backward output, in the
        return a * s * 2 * e  # activations' dtype; the saved probabilities stay until softmax's backward ends
    return a * s * (4 + 4) - (a * s * e if e != 4 else 0)


def math_softmax_backward(model: ModelSpec, train: TrainSpec) -> int:
    """SDPA's math kernel (attention.effective_attention: Falcon-7B's multi-query call) at its softmax's backward,
    per token, beside the saved fp32 probabilities: probs @ v's backward has made the gradient of the probabilities
    and _softmax_backward_data writes the scores' gradient, both fp32 (a·s·4 B each) whatever the activations'
    dtype: the kernel upcasts q, k, v (aten/src/ATen/native/transformers/attention.cpp,
    _scaled_dot_product_attention_math: query_.to(kFloat) unless allowFP16BF16ReductionMathSDP, off by default), so
    nothing is cast back before o_proj. The meta trace of Falcon-7B (bf16 full fine-tune, checkpointed, seed 88213
    #277) holds the three a·s² fp32 tensors at the backward's peak; eager_softmax_backward's in-dtype rule
    counted a·s·2·e, one fp32 tensor short when 16-bit (-23.5%)."""
    return model.num_heads * train.seq_len * 8


# RMSNorm's backward (LlamaRMSNorm, GemmaRMSNorm: x.float(), pow(2).mean(-1), x * rsqrt(...)) peaks at this many fp32
# tensors of its input's shape: the gradient through the product by rsqrt (MulBackward0), MeanBackward1's expanded
# gradient and PowBackward0's three (pow_backward: self.pow(1), its doubling, the product with the gradient; torch
# derivatives.yaml); the output's gradient is freed by then. The meta trace shows these five.
RMSNORM_BACKWARD_FP32 = 5


def final_norm_backward(model: ModelSpec, train: TrainSpec) -> int:
    """Per token, beside every saved set: the final RMSNorm's backward (RMSNORM_BACKWARD_FP32 H-wide fp32 tensors),
    the backward's peak once a fused loss returns only a b·s x H gradient. Liger's RMSNorm and LayerNorm make one
    gradient in one kernel (counted with the loss's): 0 there. A trained weight's product (full fine-tuning) ran its
    backward first, releasing the normalized input it saved (saved_set._norm)."""
    if train.liger or model.model_type in saved_set.LAYER_NORM_TYPES:
        return 0
    h = model.hidden_size
    e = 4 if model.model_type.startswith("gemma") else saved_set.Ctx.of(train).e
    released = h * e if train.method == "full" else 0
    return RMSNORM_BACKWARD_FP32 * 4 * h - released


def input_norm_backward(model: ModelSpec, train: TrainSpec) -> int:
    """Per token, alive at a layer's last backward op, its input norm's, once every weight gradient of the layer is
    made, beyond the layer's kept input (checkpointed) or the earlier layers' saved sets (not): the residual
    stream's gradient waiting for the norm's, the input the norm saved (a 16-bit RMSNorm's own fp32 copy, which a
    checkpointed layer's recompute makes again; else the layer input itself, counted already when checkpointed),
    and the backward's working set: RMSNorm's RMSNORM_BACKWARD_FP32 tensors; LayerNorm's and Liger's RMSNorm's one
    fused backward (native_layer_norm_backward, LigerRMSNormFunction.backward) holds the output's gradient and the
    input's. Checked on the meta trace's live tensors (FSDP full fine-tuning, tests/test_parallel.py)."""
    h, e = model.hidden_size, unquantized_dtype_bytes(train)
    input_saved = 0 if train.gradient_checkpointing else h * e
    if model.model_type in saved_set.LAYER_NORM_TYPES or train.liger:
        return 3 * h * e + input_saved
    return h * e + RMSNORM_BACKWARD_FP32 * 4 * h + (4 * h if e != 4 else input_saved)


@lru_cache(maxsize=4096)
def mlp_out_forward(model: ModelSpec, train: TrainSpec) -> int:
    """Per token, alive beside the saved sets in the last layer's forward at its MLP output linear's LoRA add (a
    dense layer; 0 otherwise), what a fused loss leaves as the forward's peak and FSDP's small
    weights make the step's: the model's input embedding (LlamaModel.forward keeps `inputs_embeds` until it
    returns), the layer's input (the caller's `hidden_states`), the residual after attention and the MLP's input
    (decoder-layer locals), the product act(gate) * up (down_proj's argument) and PEFT's cast of it to the
    adapter dtype (_cast_input_dtype, a local of Linear.forward), each unless saved; then the add itself: the base
    output, the scaled LoRA output and their sum. peft/tuners/lora/layer.py 0.21 (Linear.forward: `result +
    lora_B(lora_A(dropout(x))) * scaling` in the promoted dtype); bnb.py (Linear4bit/8bitLt: the LoRA output cast
    to the result's dtype before the add). Checked on the meta trace's live tensors
    (tests/test_estimate_moments.py). A checkpointed gated MLP's up_proj add can be larger (_up_add)."""
    layer = model.layers[-1][1]
    if layer.mlp == "moe" or train.dora or model.model_type.startswith("gemma"):
        return 0
    up = _up_add(model, layer, train)
    if train.activation_offload == "off":
        return max(up, _down_add(model, layer, train))
    return up + (_ckpt_input_stash(model, train) if up and train.activation_offload == "all" else 0)


def _ckpt_input_stash(model: ModelSpec, train: TrainSpec) -> int:
    """Per token, --activation-offload all with checkpointing, in the last layer's forward: the checkpointed layer
    inputs (torch's _NoopSaveInputs, the only saves TRL's hooks see) that its forward stash still holds on the
    device, the max_fwd_stash_size most recent (trl/models/activation_offloading.py pack_tensor evicts an id only
    when a later one is max_fwd_stash_size ahead), less the first layer's when offload.device_host keeps it on the
    device anyway (a frozen embedding's output). The meta trace: seed 131337 draw 26 (4 layers: all four inputs)."""
    from memplan.estimate.offload import MAX_FWD_STASH

    n = model.num_layers
    leaf = train.method == "lora" and "embed_tokens" not in train.modules_to_save
    return (min(n, MAX_FWD_STASH) - (1 if leaf and n <= MAX_FWD_STASH else 0)) * model.hidden_size * saved_set.Ctx.of(
        train, model).e


def _down_add(model: ModelSpec, layer: LayerSpec, train: TrainSpec) -> int:
    """mlp_out_forward at the MLP output linear (the last mark)."""
    ctx = saved_set.Ctx.of(train, model)
    sv = saved_set.layer_saved(model, layer, ctx)
    e, lb = ctx.e, ctx.lb
    down, down_input = sv.marks[-1][0], sv.marks[-1][1]
    ckpt = train.gradient_checkpointing  # a checkpointed layer saves nothing: all of these are locals
    # LLM.int8 nodes hold their inputs (counted with the stored set: activations._int8_held)
    saved = (set() if ckpt else set(sv.kept)) | set(sv.int8_inputs)
    # a parallel layer (GPT-NeoX, Falcon) holds the attention's output instead of the residual after it, and
    # FalconDecoderLayer its attention norm's output too (attention_layernorm_out)
    mid = next((n for n in ("o_proj.out", "dense.out", "out_proj.out") if n in sv.size), None) \
        if layer.parallel_attn else "h1"
    norms = ["norm2.out" if "norm2.out" in sv.size else "norm1.out"]
    if model.model_type == "falcon" and "norm2.out" in sv.size:
        norms.append("norm1.out")
    stream = [mid, *norms, down_input] + ([] if ckpt else ["x"])  # checkpointed: x is kept anyway
    alive = sum(sv.size.get(n, 0) for n in dict.fromkeys(stream) if n and n not in saved)
    if not ckpt:  # the embedding's output, unless layer 0 saves it as its input (checkpointed: kept)
        first = saved_set.layer_saved(model, model.layers[0][1],
                                      act._ctx(model, train, act.first_input_frozen(model, train)))
        alive += 0 if "x" in first.kept else model.hidden_size * e
    out = down.out_features
    if train.method != "lora" or not is_target(down, train):
        return alive + out * e
    if saved_set.casts(train, e) and f"{down.name}.cast" not in saved:
        alive += down.in_features * lb
    if train.quantized and down.quantizable:  # bitsandbytes' LoRA layers cast the LoRA output first
        return alive + 3 * out * e
    return alive + out * (e + lb + (4 if _sum_promotes(train) else max(e, lb)))


def _up_add(model: ModelSpec, layer: LayerSpec, train: TrainSpec) -> int:
    """mlp_out_forward at a checkpointed gated MLP's up_proj LoRA add (LlamaMLP et al. `down_proj(act_fn(
    gate_proj(x)) * up_proj(x))`; LigerSwiGLUMLP the same with gate_proj's output as the argument): act(gate) (or
    the gate itself) waits beside up_proj's add, its base output, the LoRA output cast to the result's dtype and the
    sum (peft/tuners/lora/bnb.py 0.21 Linear4bit/8bitLt.forward; layer.py Linear.forward promotes), with PEFT's cast
    of its input and the residual after attention; the MLP's input unless LLM.int8 holds it. Net of what the stored
    set counts for the last layer that does not exist yet: down_proj's LLM.int8 input (the product). The meta trace's
    live tensors at the forward peak: fresh seed 131337 draw 26 (Llama-3-8B 8-bit, fp32, checkpointed, offload all,
    Liger: four b·s x i fp32 tensors). 0 without checkpointing (the saved set overlaps these), for a fused gate_up
    or an up_proj that is no LoRA target."""
    lins = {lin.name: lin for lin in layer.linears}
    up = lins.get("up_proj")
    if (not train.gradient_checkpointing or layer.mlp != "gated" or "gate_proj" not in lins or up is None
            or train.method != "lora" or not is_target(up, train)):
        return 0
    ctx = saved_set.Ctx.of(train, model)
    sv = saved_set.layer_saved(model, layer, ctx)
    e, lb, i = ctx.e, ctx.lb, up.out_features
    held = set(sv.int8_inputs)
    stream = sum(sv.size.get(n, 0) for n in ("h1", "norm2.out" if "norm2.out" in sv.size else "norm1.out")
                 if n not in held)
    alive = stream + i * e + (up.in_features * lb if saved_set.casts(train, e) else 0)
    if train.quantized and up.quantizable:
        alive += 3 * i * e
    else:
        alive += i * (e + lb + (4 if _sum_promotes(train) else max(e, lb)))
    return max(alive - (sv.size.get("mlp.prod", 0) if "mlp.prod" in held else 0), 0)


@lru_cache(maxsize=4096)
def down_forward(model: ModelSpec, train: TrainSpec) -> tuple[int, int]:
    """The last layer's forward at a gated MLP's down_proj base matmul, where Liger's Phi-3 MLP or activation offload
    all (without checkpointing) hold more than the gate/up moment (fwd_transient, which pairs the largest dequantized
    weight): (per token beside the earlier layers' kept bytes, absolute: down_proj's dequantized weight). Alive: the
    product (down_proj's input), down_proj's output (in the compute dtype, cast to the stream's), the decoder layer's
    locals (`residual`, the MLP's input) and what the layer saved so far: all of it (no offloading); under offload
    all, TRL's forward stash, the offloaded saves within max_fwd_stash_size ids (offload.stash_before: act(gate)
    and up, the gate, or Liger's two inputs); checkpointed, nothing. LigerPhi3SwiGLUMLP.forward (liger-kernel 0.8.5
    transformers/swiglu.py) keeps the gate_up output as its local `up_states` until down_proj returns, beside the two
    contiguous copies LigerSiLUMulFunction's @ensure_contiguous made of its chunks and saved. The meta trace's live
    tensors at the forward peak: draw 205 of seed 88213 (Phi-3 4-bit, offload all: the gate_up moment, none of
    Liger's extras), draw 131 (Gemma 4-bit, offload all: gate, act(gate), up and the product beside down_proj's
    dequantized weight). (0, 0) elsewhere."""
    from memplan.estimate import offload

    layer = model.layers[-1][1]
    fused = next((lin for lin in layer.linears if lin.name == "gate_up_proj"), None)
    ckpt = train.gradient_checkpointing
    offloaded = train.activation_offload == "all" and not ckpt
    if layer.mlp != "gated" or not (offloaded or (train.liger and fused)) or train.bits == 8:
        return 0, 0  # LLM.int8 (not modelled here): MatMul8bitLt holds its inputs itself (activations._int8_held)
    ctx = saved_set.Ctx.of(train, model)
    e, c, h = ctx.e, ctx.c, model.hidden_size
    sv = saved_set.layer_saved(model, layer, ctx)
    down, start = sv.marks[-1][0], sv.mark_starts[-1]
    if down.name != "down_proj" or "mlp.prod" not in sv.size:
        return 0, 0
    out = sv.size["mlp.prod"] + h * c + (h * e if e != c else 0)
    if train.liger and fused:
        out += fused.out_features * e  # up_states
    saved = set() if ckpt or offloaded else set(sv.kept)
    local = ("h1", "norm2.out")
    out += sum(sv.size[n] for n in local if n in sv.size and n not in saved)
    if offloaded:
        out += offload.stash_before(sv, start, offload.MAX_FWD_STASH, {"x", "mlp.prod", *local})
    elif not ckpt:  # the layer's saved set so far (the layer input is counted with the kept bytes)
        own = sum(sv.size[n] for n in sv.kept if n.startswith(down.name + "."))
        out += sv.total() - own - (sv.size["x"] if "x" in sv.kept else 0)
    dequant = down.weight_numel * c if train.quantized and down.quantizable else 0
    return out, dequant


@lru_cache(maxsize=4096)
def frozen_plain_mlp_backward(model: ModelSpec, train: TrainSpec) -> int:
    """Per token, a checkpointed plain MLP (GPT-NeoX, OPT) whose linears are all frozen bitsandbytes ones
    (MatMul4Bit / MatMul8bitLt keep ctx.tensors: nothing to unpack, so nothing starts the recompute early): beside
    each projection's dequantized weight in its backward, the residual stream's gradient and the i-wide gradient it
    takes or makes. The down projection's backward runs before the recompute starts, the up projection's after the
    activation's backward released the MLP's recomputed saved set (estimate/__init__.py layer_bwd). 0 where this
    does not apply (a uniform stack only: one layer group)."""
    layer = model.layers[-1][1]
    if not (train.gradient_checkpointing and train.quantized and train.method == "lora" and layer.mlp == "plain"
            and len(model.layers) == 1 and all(lin.quantizable for lin in layer.linears)
            and not any(is_target(lin, train) for lin in layer.linears
                        if lin.name in ("dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2"))):
        return 0
    e = unquantized_dtype_bytes(train)
    return model.hidden_size * e + layer.linears[-1].in_features * e


@lru_cache(maxsize=4096)
def int8_graph_held(model: ModelSpec, train: TrainSpec) -> int:
    """Per token: every LLM.int8 input that needs a gradient, with its outlier columns, in every layer. MatMul8bitLt
    keeps them in ctx.tensors, plain attributes that live as long as the graph (bitsandbytes autograd/_functions.py
    0.50), not saved tensors that autograd frees as each node runs: they are still on the device at the input
    embedding's backward (EmbeddingBackward0), after every layer's backward. Layer 0 without checkpointing, with a
    frozen embedding: only its inputs that need a gradient. `train`: activations()' layer key."""
    if train.bits != 8:
        return 0
    from memplan.estimate.lora import head_and_embedding_grads

    frozen0 = (train.method == "lora" and not train.gradient_checkpointing
               and not head_and_embedding_grads(model, train)["embed"])
    total = 0
    for i, (n, layer) in enumerate(model.layers):
        for first, count in (((True, 1), (False, n - 1)) if i == 0 and frozen0 else ((False, n),)):
            sv = saved_set.layer_saved(model, layer, act._ctx(model, train, first))
            total += count * (sum(sv.size[x] for x in sv.int8_inputs) + act.int8_outliers(sv))
    return total
