"""What is being fine-tuned (ModelSpec) and how (TrainSpec).

ModelSpec is the architecture normalized from a Hugging Face config.json (see architectures.py): every parameter
tensor of the model, grouped as transformers builds them, so that parameter counts are exact and each memory
formula can ask "which linears, of what shape, in how many layers". TrainSpec holds every training setting that
changes memory. Both are plain frozen dataclasses: no torch, cheap to build by the thousand.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import cached_property

from memplan.errors import MemplanError
from memplan.stack import MAJORS, check_major

# --------------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Linear:
    """One `nn.Linear` inside a decoder layer: what bitsandbytes quantizes and PEFT can target."""

    name: str  # the module's attribute name in transformers (q_proj, dense_h_to_4h, ...)
    in_features: int
    out_features: int
    bias: bool = False
    # transformers' replace_with_bnb_linear converts only modules whose type *is* nn.Linear: subclasses such as
    # Falcon's FalconLinear stay unquantized in the compute dtype (integrations/bitsandbytes.py, v5).
    quantizable: bool = True

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def numel(self) -> int:
        return self.weight_numel + (self.out_features if self.bias else 0)


def _hash_once(cls):
    """A frozen dataclass whose hash is computed once: estimate's caches key on the model and its layers, and a
    generated hash walks every nested field each time. The cached hash is not pickled (string hashes differ between
    processes)."""
    generated = cls.__hash__

    def __hash__(self):
        try:
            return self.__dict__["_hash"]
        except KeyError:
            h = self.__dict__["_hash"] = generated(self)
            return h

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    cls.__hash__, cls.__getstate__ = __hash__, __getstate__
    return cls


@_hash_once
@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer. Layers that are alike are stored once, with a count, in ModelSpec.layers."""

    linears: tuple[Linear, ...]
    norm_params: int  # layer/RMS norm weights (and biases): never quantized
    # Mixture of experts. transformers 5 stores experts as fused 3-D parameters (gate_up_proj [E, 2I, H],
    # down_proj [E, H, I]), not nn.Linear: bitsandbytes leaves them in the compute dtype and PEFT's linear
    # targets do not reach them. The router is an nn.Parameter [E, H] (not quantized either).
    expert_params: int = 0
    router_params: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    # Activation-shape facts the estimator needs.
    mlp: str = "gated"  # gated (SwiGLU/GeGLU: act(gate)*up), plain (fc1 -> act -> fc2), moe
    parallel_attn: bool = False  # attention and MLP read the same normed input (Falcon-7B, GPT-NeoX)
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head

    @property
    def linear_params(self) -> int:
        return sum(lin.numel for lin in self.linears)

    @property
    def params(self) -> int:
        return self.linear_params + self.norm_params + self.expert_params + self.router_params


@_hash_once
@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    source: str  # where the architecture came from: catalog entry source, a file path, or a hub cache path
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layers: tuple[tuple[int, LayerSpec], ...]  # (how many, layer) groups, in order
    embedding_params: int  # token embeddings (+ learned position embeddings)
    lm_head_params: int  # 0 when tied to the input embeddings
    other_params: int  # final norm, projections outside the layers (OPT project_in/out)
    other_linears: tuple[Linear, ...] = ()  # nn.Linear outside the layers that bitsandbytes quantizes (OPT)
    tie_word_embeddings: bool = False
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)
    stated_params: int | None = None  # the officially stated parameter count, where the catalog has one
    # what the output should say about how the config was read (aliases, auto_map, derived parts)
    notes: tuple[str, ...] = field(default=(), compare=False)
    # True when the spec was read off the model transformers builds (memplan/derive), not a hand-written builder:
    # its activation terms then come from short meta traces (memplan/estimate/derived.py)
    derived: bool = False

    @property
    def num_layers(self) -> int:
        return sum(n for n, _ in self.layers)

    @cached_property
    def max_quantized_numel(self) -> int:
        """Elements of the largest quantizable linear weight: its dequantized copy is the biggest bitsandbytes
        temporary (0 when bitsandbytes quantizes nothing, as for Falcon)."""
        return max((lin.weight_numel for _, layer in self.layers for lin in layer.linears if lin.quantizable), default=0)

    @cached_property
    def total_params(self) -> int:
        return (
            self.embedding_params
            + self.lm_head_params
            + self.other_params
            + sum(lin.numel for lin in self.other_linears)
            + sum(n * layer.params for n, layer in self.layers)
        )

    def param_counts(self) -> dict:
        """The counts `memplan params` prints; each equals what transformers builds for the same config."""
        linear_weights = sum(n * sum(lin.weight_numel for lin in layer.linears if lin.quantizable)
                             for n, layer in self.layers)
        linear_weights += sum(lin.weight_numel for lin in self.other_linears if lin.quantizable)
        return {
            "total": self.total_params,
            "embedding": self.embedding_params,
            "lm_head": self.lm_head_params,
            "layers": sum(n * layer.params for n, layer in self.layers),
            "per_layer": [layer.params for n, layer in self.layers for _ in range(n)],
            "quantizable_linear_weights": linear_weights,
            "experts": sum(n * layer.expert_params for n, layer in self.layers),
            "other": self.other_params + sum(lin.bias * lin.out_features for lin in self.other_linears),
            "num_layers": self.num_layers,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


# --------------------------------------------------------------------------------------------- the training

BITS = (4, 8, 16, 32)
QUANT_TYPES = ("nf4", "fp4")
DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHODS = ("lora", "full")
LORA_TARGET_SETS = ("qv", "attn", "all-linear")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd", "adafactor")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
ATTENTION_ALIASES = {"fa2": "flash_attention_2", "flash-attention-2": "flash_attention_2", "flash": "flash_attention_2"}
ACTIVATION_OFFLOADS = ("off", "all", "checkpoints")
LOSSES = ("standard", "liger", "cce")
LOSS_ALIASES = {"fused": "liger"}  # the issue's --loss fused: Liger's fused linear cross-entropy
# Multi-GPU data parallelism (#13). "auto": no parallelism on one GPU, fsdp (FULL_SHARD) on more.
PARALLELS = ("auto", "none", "ddp", "fsdp", "fsdp-grad-op", "zero1", "zero2", "zero3")
SHARDED_WEIGHTS = ("fsdp", "fsdp-grad-op", "zero3")  # strategies that shard the (frozen) weights
FSDP_VERSIONS = (1, 2)
OFFLOADS = ("none", "optimizer", "params")
# bitsandbytes' bnb_4bit_quant_storage: the dtype the packed 4-bit bytes are stored as ("auto": uint8, the
# bitsandbytes default, unless FSDP / ZeRO-3 shards the 4-bit weights: then the compute dtype, as PEFT's
# FSDP-QLoRA and DeepSpeed-QLoRA guides set it).
QUANT_STORAGES = ("auto", "uint8", "bf16", "fp16", "fp32")


@_hash_once
@dataclass(frozen=True)
class TrainSpec:
    """Every setting that changes memory. Defaults are the common QLoRA recipe (Dettmers et al. 2023; the
    PEFT/TRL example scripts): NF4 with double quantization, bf16 compute, prepare_model_for_kbit_training,
    LoRA r=16 on all linear layers, AdamW, gradient checkpointing, SDPA attention."""

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"
    method: str = "lora"
    upcast: bool = True  # PEFT prepare_model_for_kbit_training (only meaningful for 4/8-bit)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dtype: str = "fp32"  # PEFT autocast_adapter_dtype=True keeps adapters in fp32
    dora: bool = False
    optimizer: str = "adamw"
    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = True
    attention: str = "sdpa"
    modules_to_save: tuple[str, ...] = ()  # e.g. ("lm_head", "embed_tokens"): fully trained copies
    # #11: activation offloading to pinned host memory: "all" = every saved tensor (TRL/torchtune
    # OffloadActivations), "checkpoints" = only the checkpointed layer inputs (transformers
    # gradient_checkpointing_enable(offload=True)); memplan/offload.py holds the model
    activation_offload: str = "off"
    loss: str = "standard"  # standard (logits + cross_entropy) | liger | cce: fused linear cross-entropy (losses.py)
    liger: bool = False  # Liger Kernel's RMSNorm / SwiGLU / RoPE (apply_liger_kernel_to_*); liger.py
    gpus: int = 1  # data-parallel ranks (GPUs); memory is reported per rank
    parallel: str = "auto"  # see PARALLELS
    fsdp_version: int = 2  # torch FSDP1 (FlatParameter) or FSDP2 (fully_shard, per-parameter DTensor shards)
    offload: str = "none"  # FSDP CPUOffload / ZeRO-Offload: what lives in host RAM instead of on the GPU
    quant_storage: str = "auto"  # see QUANT_STORAGES
    # The transformers major whose code path the result describes (memplan/stack.py): 0 at construction means
    # the installed one (package metadata, cached), so a built TrainSpec always holds 4 or 5.
    transformers: int = 0

    def __post_init__(self):
        _check_choice("bits", self.bits, BITS)
        _check_choice("quant-type", self.quant_type, QUANT_TYPES)
        _check_choice("compute-dtype", self.compute_dtype, DTYPES)
        _check_choice("method", self.method, METHODS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.attention in ATTENTION_ALIASES:
            object.__setattr__(self, "attention", ATTENTION_ALIASES[self.attention])
        _check_choice("attention", self.attention, ATTENTIONS)
        _check_choice("lora-dtype", self.lora_dtype, DTYPES)
        if self.loss in LOSS_ALIASES:
            object.__setattr__(self, "loss", LOSS_ALIASES[self.loss])
        _check_choice("activation-offload", self.activation_offload, ACTIVATION_OFFLOADS)
        _check_choice("loss", self.loss, LOSSES)
        if self.attention == "flash_attention_2" and (self.bits == 32 or self.compute_dtype == "fp32"):
            raise MemplanError("flash_attention_2 runs in fp16/bf16 only (flash-attn's kernels); use --compute-dtype "
                               "bf16 and 4/8/16-bit weights, or --attention sdpa")
        if self.loss == "cce" and self.upcast_applies:
            raise MemplanError("--loss cce: Cut Cross-Entropy's backward takes bf16/fp16 hidden states only "
                               "(cut_cross_entropy/cce_backward.py), and prepare_model_for_kbit_training makes them "
                               "fp32: add --upcast off, or use --loss liger")
        if self.loss == "cce" and (self.bits == 32 or self.compute_dtype == "fp32"):
            raise MemplanError("--loss cce needs bf16/fp16 hidden states (cut_cross_entropy/cce_backward.py)")
        if self.activation_offload == "checkpoints" and not self.gradient_checkpointing:
            raise MemplanError("activation-offload checkpoints offloads the checkpointed layer inputs: it needs "
                               "--checkpointing on (or use --activation-offload all)")
        object.__setattr__(self, "transformers", check_major(self.transformers))
        for name in ("batch_size", "seq_len", "lora_r", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MemplanError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MemplanError(f"lora-dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.method == "full" and self.bits in (4, 8):
            raise MemplanError("full fine-tuning needs 16- or 32-bit weights (bitsandbytes 4/8-bit weights are frozen)")
        _check_parallel(self)
        if isinstance(self.lora_targets, str) and self.lora_targets not in LORA_TARGET_SETS:
            object.__setattr__(self, "lora_targets", tuple(t for t in self.lora_targets.split("+") if t))
        if isinstance(self.lora_targets, (list, tuple)):
            if not self.lora_targets:
                raise MemplanError("lora-targets is empty")
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @property
    def quantized(self) -> bool:
        return self.bits in (4, 8)

    @property
    def upcast_applies(self) -> bool:
        return self.upcast and self.quantized

    @property
    def strategy(self) -> str:
        """The parallelism that runs: "none" on one GPU unless another was asked for, fsdp for N > 1 by default."""
        if self.parallel == "auto":
            return "none" if self.gpus == 1 else "fsdp"
        return self.parallel

    @property
    def storage(self) -> str:
        """The bnb_4bit_quant_storage dtype that runs (see QUANT_STORAGES)."""
        if self.quant_storage != "auto":
            return self.quant_storage
        return self.compute_dtype if self.bits == 4 and self.strategy in SHARDED_WEIGHTS else "uint8"

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in TRAIN_FIELDS}  # asdict() deep-copies: 10x slower
        d["lora_targets"] = self.lora_targets if isinstance(self.lora_targets, str) else list(self.lora_targets)
        d["modules_to_save"] = list(self.modules_to_save)
        return d

    def with_(self, **changes) -> "TrainSpec":
        return replace(self, **changes)

    def variant(self, **changes) -> "TrainSpec":
        """A copy with fields changed and no checks (a cache key derived from this valid spec: with_() re-runs
        every check, a fifth of an estimate's time)."""
        new = object.__new__(TrainSpec)
        d = new.__dict__
        d.update(self.__dict__)
        d.pop("_hash", None)  # not the original's cached hash
        d.update(changes)
        return new


TRAIN_FIELDS = tuple(f.name for f in fields(TrainSpec))
# The values each choice field accepts: the checks below and the web form's selects read the same tuples.
CHOICES = {"bits": BITS, "quant_type": QUANT_TYPES, "compute_dtype": tuple(DTYPES), "method": METHODS,
           "optimizer": OPTIMIZERS, "attention": ATTENTIONS, "lora_dtype": tuple(DTYPES),
           "activation_offload": ACTIVATION_OFFLOADS, "loss": LOSSES, "parallel": PARALLELS,
           "fsdp_version": FSDP_VERSIONS, "offload": OFFLOADS, "quant_storage": QUANT_STORAGES,
           "transformers": MAJORS}


def _check_parallel(t: TrainSpec) -> None:
    """Multi-GPU combinations that the libraries refuse, or that mean nothing, as one-line errors."""
    _check_choice("parallel", t.parallel, PARALLELS)
    _check_choice("fsdp-version", t.fsdp_version, FSDP_VERSIONS)
    _check_choice("offload", t.offload, OFFLOADS)
    _check_choice("quant-storage", t.quant_storage, QUANT_STORAGES)
    if isinstance(t.gpus, bool) or not isinstance(t.gpus, int) or t.gpus <= 0:
        raise MemplanError(f"gpus must be a positive integer, got {t.gpus!r}")
    s = t.strategy
    if s == "none" and t.gpus > 1:
        raise MemplanError(f"--gpus {t.gpus} needs a strategy: --parallel ddp|fsdp|fsdp-grad-op|zero1|zero2|zero3")
    if t.gpus == 1 and (s == "ddp" or (s in ("zero1", "zero2", "fsdp-grad-op") and t.offload == "none")):
        raise MemplanError(f"--parallel {s} on one GPU shards nothing (use --gpus N > 1, or --parallel fsdp / zero3, "
                           "or an --offload)")
    if t.offload != "none":
        if s == "none":
            raise MemplanError("--offload needs --parallel fsdp or zero1/zero2/zero3 (FSDP CPUOffload, ZeRO-Offload)")
        if t.offload == "optimizer" and s in ("ddp", "fsdp", "fsdp-grad-op"):
            raise MemplanError(f"--offload optimizer is ZeRO-Offload (zero1/zero2/zero3); {s} offloads parameters, "
                               "gradients and optimizer together (torch CPUOffload(offload_params=True)): "
                               "use --offload params" if s != "ddp" else
                               "--offload optimizer needs --parallel zero1|zero2|zero3 (DDP offloads nothing)")
        if t.offload == "params" and s in ("ddp", "zero1", "zero2"):
            raise MemplanError(f"--offload params needs sharded parameters (--parallel fsdp, fsdp-grad-op or zero3); "
                               f"{s} keeps a full copy on every GPU")
    if s in ("fsdp", "fsdp-grad-op") and t.fsdp_version == 2 and t.optimizer not in ("adamw", "sgd", "adafactor"):
        raise MemplanError(f"--optimizer {t.optimizer} with FSDP2: bitsandbytes' optimizer kernels have no DTensor "
                           "sharding strategy (bitsandbytes.optimizer_update_32bit fails on fully_shard's "
                           "parameters); use adamw, --fsdp-version 1, or zero2 / zero3")
    if s in SHARDED_WEIGHTS and t.bits == 8:
        raise MemplanError(f"--parallel {s} cannot shard LLM.int8 weights: bitsandbytes keeps their scales (SCB, CB) "
                           "on the Int8Params object, which sharding replaces with flat shards; accelerate and PEFT "
                           "shard only 4-bit weights (bnb_4bit_quant_storage). Use --bits 4, or ddp / zero1 / zero2")
    if s in SHARDED_WEIGHTS and t.bits == 4 and t.quant_storage == "uint8":
        if s == "zero3":
            raise MemplanError("--parallel zero3 with --quant-storage uint8: DeepSpeed ZeRO-3 partitions only "
                               "floating-point weights; set bnb_4bit_quant_storage to the compute dtype "
                               "(--quant-storage bf16, PEFT's DeepSpeed-QLoRA guide)")
        if t.fsdp_version == 1:
            raise MemplanError("FSDP1 with --quant-storage uint8: FSDP flattens each unit into one FlatParameter "
                               "of a single floating dtype, which packed uint8 4-bit weights cannot join; set "
                               "bnb_4bit_quant_storage to the compute dtype (--quant-storage bf16, PEFT's "
                               "FSDP-QLoRA guide)")


def _check_choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise MemplanError(f"unsupported {flag} {value!r}; choose one of: {', '.join(map(str, choices))}")
