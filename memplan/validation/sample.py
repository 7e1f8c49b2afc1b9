"""A seeded random sample over every training flag: the estimator's yardstick (`memplan validate --random N`).

One table, CHOICES, says how each TrainSpec field is drawn; it is the only place that knows the flags. A flag added
later (activation offloading, the loss, multi-GPU, ...) joins the sample by adding a row. A row whose field this
build's TrainSpec lacks is skipped (listed by `skipped_rows()`), so the table can name fields before they land.
Rows draw in order; a row may depend on the model and on the values drawn above it (`when`): a field whose row does
not apply keeps the TrainSpec default, so the sample holds no meaningless variation (no quant type at 16 bits).

The model is drawn type first, then a model of that type: every catalog model type is equally likely, whatever
the number of sizes the catalog lists for it. Everything is drawn from one random.Random(seed): the same seed
gives the same sample on any machine, as long as the table and the catalog are the same.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

from memplan import spec as spec_mod
from memplan.errors import MemplanError
from memplan.spec import TRAIN_FIELDS, ModelSpec, TrainSpec

Draw = Callable[[random.Random, ModelSpec, dict], Any]
When = Callable[[ModelSpec, dict], bool]


def _always(model: ModelSpec, drawn: dict) -> bool:
    return True


@dataclass(frozen=True)
class Choice:
    field: str  # the TrainSpec field this row draws
    draw: Draw  # (rng, model, values drawn so far) -> value
    when: When = _always  # does the field mean anything here (given the model and the rows above)?


def pick(*values) -> Draw:
    """Uniform over the given values."""
    return lambda rng, model, drawn: rng.choice(values)


def pick_from(constant: str, fallback: tuple) -> Draw:
    """Uniform over a spec.py constant (so a value added there, e.g. a new attention kernel, joins the sample)."""
    values = tuple(getattr(spec_mod, constant, fallback))
    return pick(*values)


def log_uniform_int(lo: int, hi: int) -> Draw:
    """An integer spread evenly in log space over [lo, hi]: as many 64..512 as 1024..8192."""
    return lambda rng, model, drawn: min(hi, max(lo, int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))))


def _layer_linears(model: ModelSpec) -> list[str]:
    names: list[str] = []
    for _, layer in model.layers:
        for lin in layer.linears:
            if lin.name not in names:
                names.append(lin.name)
    return names


def lora_targets(rng: random.Random, model: ModelSpec, drawn: dict):
    """A named set (qv, attn, all-linear) or a partial list of the model's own layer linears (q_proj+v_proj,
    k_proj+down_proj, ...), each half the time."""
    if rng.random() < 0.5:
        return rng.choice(spec_mod.LORA_TARGET_SETS)
    names = _layer_linears(model)
    k = rng.randint(1, max(1, len(names) - 1))
    return tuple(sorted(rng.sample(names, k), key=names.index))


def modules_to_save(rng: random.Random, model: ModelSpec, drawn: dict):
    """None (most runs), the output layer, the input embeddings, or both, by the names the model type uses
    (transformers 5 names GPT-NeoX's output layer lm_head; 4.x called it embed_out)."""
    emb = {"gpt_neox": "embed_in", "falcon": "word_embeddings"}.get(model.model_type, "embed_tokens")
    head = "embed_out" if model.model_type == "gpt_neox" and drawn["transformers"] == 4 else "lm_head"
    return rng.choice(((), (), (head,), (emb,), (emb, head)))


def _installed_major() -> int:
    from memplan.stack import installed_major

    return installed_major()


def quantized(model: ModelSpec, drawn: dict) -> bool:
    return drawn.get("bits") in (4, 8)


def four_bit(model: ModelSpec, drawn: dict) -> bool:
    return drawn.get("bits") == 4


def lora(model: ModelSpec, drawn: dict) -> bool:
    return drawn.get("method", "lora") == "lora"


# Every training flag, in the order they are drawn. Values come from spec.py's constants where it has them.
CHOICES: list[Choice] = [
    # The trace runs the installed transformers only (stack.check_runs_installed): the row keeps that major, so a
    # sample says which one it describes (rows below may depend on it); scripts/validate_tf4.py samples 4.x.
    Choice("transformers", lambda rng, m, d: _installed_major()),
    Choice("bits", pick_from("BITS", (4, 8, 16, 32))),
    Choice("quant_type", pick_from("QUANT_TYPES", ("nf4", "fp4")), four_bit),
    Choice("double_quant", pick(True, False), four_bit),
    Choice("compute_dtype", pick("bf16", "fp16", "fp32"), lambda m, d: d["bits"] != 32),
    Choice("method", pick_from("METHODS", ("lora", "full")), lambda m, d: d["bits"] in (16, 32)),
    Choice("upcast", pick(True, False), quantized),
    Choice("lora_r", pick(4, 8, 16, 32, 64, 128), lora),
    Choice("lora_dropout", pick(0.0, 0.05, 0.1), lora),
    Choice("lora_targets", lora_targets, lora),
    Choice("lora_dtype", pick("fp32", "bf16", "fp16"), lora),
    Choice("dora", pick(False, True), lora),
    Choice("modules_to_save", modules_to_save, lora),
    Choice("optimizer", pick_from("OPTIMIZERS", ("adamw",))),
    Choice("batch_size", lambda rng, m, d: rng.randint(1, 8)),
    Choice("seq_len", log_uniform_int(64, 8192)),
    Choice("gradient_checkpointing", pick(True, False)),
    Choice("attention", pick_from("ATTENTIONS", ("sdpa", "eager", "flash_attention_2"))),
    # #11's toolbox (activation offloading, fused losses, Liger's kernels)
    Choice("activation_offload", pick_from("ACTIVATION_OFFLOADS", ("off", "all", "checkpoints"))),
    Choice("loss", pick_from("LOSSES", ("standard", "liger", "cce"))),
    Choice("liger", pick(False, True)),
    # #13's multi-GPU rows stay at one GPU here: `validate --against trace --multi-gpu K` samples them against the
    # rank trace (DeepSpeed's engine and CPU offload are not traced: most random strategy mixes are refused).
    Choice("gpus", pick(1)),
    Choice("parallel", pick("auto", "ddp", "fsdp", "fsdp-grad-op", "zero1", "zero2", "zero3"),
           lambda m, d: d.get("gpus", 1) > 1),
    Choice("fsdp_version", pick(1, 2), lambda m, d: str(d.get("parallel", "")).startswith("fsdp")),
    Choice("offload", pick("none", "optimizer", "params"), lambda m, d: d.get("gpus", 1) > 1),
    Choice("quant_storage", pick("uint8", "bf16", "fp16", "fp32"), four_bit),
]


def refusal(model: ModelSpec, train: TrainSpec) -> str | None:
    """Why the trace refuses this combination on this stack (the sampler draws again), or None. Each reason is the
    one-line error the trace (or the estimate) gives for it, so the report can name it."""
    from memplan.library_facts import LIGER_TYPES

    if train.strategy != "none" and untraceable(train):  # DeepSpeed ZeRO, FSDP1, CPU offload: estimated, not traced
        return untraceable(train)  # (trace/distributed.py says why)
    if model.derived and train.bits == 8:  # memplan/derive/__init__.py: its fitting traces refuse 8-bit
        return "--bits 8 on a derived architecture: its activation terms are fitted without an 8-bit meta trace"
    if train.attention == "flash_attention_2" and model.model_type == "falcon":
        return ("flash_attention_2 on Falcon: FalconFlashAttention2 calls _flash_attention_forward, which "
                "modeling_falcon.py imports only when flash-attn is installed (it is not here), outside the "
                "attention interface the trace's flash-attention model serves")
    if train.liger and model.model_type not in LIGER_TYPES:
        return "--liger on: liger-kernel has no RMSNorm/SwiGLU kernels for this model type"
    if train.loss != "standard" and {"lm_head", "embed_out"} & set(train.modules_to_save):
        return (f"--loss {train.loss} takes the output layer's weight as a plain tensor (recipe.compute_loss): "
                "a modules_to_save-wrapped output layer is not supported")
    return None


def active_rows() -> list[Choice]:
    return [c for c in CHOICES if c.field in TRAIN_FIELDS]


def skipped_rows() -> list[str]:
    """Fields the table names that this build's TrainSpec does not have (yet)."""
    return [c.field for c in CHOICES if c.field not in TRAIN_FIELDS]


DEPTH_MARK = "@layers="


def capped_name(name: str, layers: int | None) -> str:
    """The name validate's trace cache and workers use for `name` with its decoder capped at `layers` layers."""
    return f"{name}{DEPTH_MARK}{layers}" if layers else name


def resolve_sampled(ref: str) -> ModelSpec:
    """A catalog model, or one named by capped_name(): the same architecture (every field of its config.json)
    with num_hidden_layers = min(its own, the cap). The estimate and the trace then see the same model; a trace
    costs time in proportion to the layers, and every layer of these architectures is alike (Gemma-2's
    alternating sliding / global layers both appear from 2 layers on)."""
    from dataclasses import replace

    from memplan.architectures import from_hf_config
    from memplan.catalog import resolve_model

    name, _, layers = ref.partition(DEPTH_MARK)
    model = resolve_model(name)
    if not layers:
        return model
    cap = int(layers)
    if cap >= model.num_layers:
        return model
    cfg = {**model.hf_config, "num_hidden_layers": cap}
    return replace(from_hf_config(cfg, ref, f"{model.source} (num_hidden_layers {model.num_layers} -> {cap})"),
                   stated_params=None)


def model_names_by_type(names: list[str]) -> dict[str, list[str]]:
    from memplan.catalog import resolve_model

    by_type: dict[str, list[str]] = {}
    for n in names:
        by_type.setdefault(resolve_model(n).model_type, []).append(n)
    return {t: sorted(v) for t, v in sorted(by_type.items())}


def untraceable(train: TrainSpec) -> str | None:
    from memplan.trace.distributed import traceable  # torch-free at import

    return traceable(train)


def draw_configs(seed: int, model_names: list[str], max_tries: int = 50, refused: dict | None = None):
    """Yield (draw index, model name, TrainSpec) forever, deterministically from `seed`. A combination TrainSpec
    rejects (it says why on the command line too) or the trace refuses (refusal()) is drawn again; `refused`, when
    given, counts the redraws by reason."""
    from memplan.catalog import resolve_model

    rng = random.Random(seed)
    by_type = model_names_by_type(model_names)
    types = list(by_type)
    rows = active_rows()
    index = 0
    while True:
        name = rng.choice(by_type[rng.choice(types)])
        model = resolve_model(name)
        for _ in range(max_tries):
            drawn: dict = {}
            for row in rows:
                if row.when(model, drawn):
                    drawn[row.field] = row.draw(rng, model, drawn)
            try:
                train = TrainSpec(**drawn)
            except MemplanError as e:
                why = str(e)
            else:
                why = refusal(model, train)
                if why is None:
                    break
            if refused is not None:
                refused[why] = refused.get(why, 0) + 1
        else:
            raise MemplanError(f"validate --random: no valid training settings drawn for {name} in {max_tries} tries")
        yield index, name, train
        index += 1
