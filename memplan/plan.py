"""Planning against a memory budget: the largest context and batch that fit, and what to change when nothing fits.

    fit(model, train, budget) -> Fit

Everything is judged on the estimate's **device total** (`Estimate.device_total_bytes`: the tensor peak plus CUDA
context, cuBLAS workspace and caching-allocator overhead: what nvidia-smi shows) against the budget less a safety
margin. The estimate is monotone non-decreasing in sequence length, micro-batch, LoRA rank and weight bits
(tests/test_properties.py checks it), so each "largest value that fits" is found by exponential bracketing from
the current value and then bisection: a few dozen estimates decide thousands of configurations. Whatever the
shape of the estimate, the bisection keeps `fits(lo) and not fits(hi)` and stops at hi = lo + step, so the answer
is always the last fitting value before the first failing one in the searched range.

Granularity: sequence lengths are searched in multiples of SEQ_STEP (64) tokens, the usual packing / kernel tile
multiple; batch sizes and LoRA ranks exactly.

Default margin (DEFAULT_MARGIN, 5% of the budget): the device total already includes the default 10% allocator
overhead and a ~400 MiB CUDA context (estimate/overhead.json), but those are uncalibrated defaults; the analytic
estimate is within a few percent of the exact trace; and a desktop GPU also drives the display (a few hundred MiB
that nvidia-smi counts). 5% covers those unknowns together (1.2 GiB on a 24 GiB card) without throwing away a large
slice of an 80 GiB one; `--margin 0` trusts the estimate exactly.

Changes are ranked by how little they give up (TIERS, cheapest first); each is listed with the device total it
reaches and its cost with a source where one is known. When no single change is enough, `combination` applies the
changes greedily in that order, cumulatively (skipping any that would raise the device total), until the
configuration fits.

The ranking follows what each change gives up: nothing (fused attention, 8-bit optimizer states), compute
(checkpointing), quality that the papers cited in COSTS found unchanged or nearly so (quantized base weights,
LoRA rank), throughput (micro-batch with gradient accumulation: the same gradients), quality that is known to
drop (fewer target modules), unquantified recipe changes (dropout, the fp32 upcast), and last, data (a shorter
context).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

from memplan.errors import MemplanError
from memplan.spec import ModelSpec, TrainSpec
from memplan.stack import stack

GIB = 2**30
SEQ_STEP = 64  # sequence-length granularity of every search
SEQ_CAP = 2**20  # 1,048,576 tokens: longest sequence searched
BATCH_CAP = 4096  # largest micro-batch searched
DEFAULT_MARGIN = "5%"
RANK_FLOOR = 8  # in a combination, a rank search that finds nothing leaves the rank at min(r, 8)

_UNITS = {"b": 1, "kib": 2**10, "kb": 10**3, "mib": 2**20, "mb": 10**6, "gib": 2**30, "gb": 10**9,
          "tib": 2**40, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """'24GiB', '24 GB', '512MiB', '80g' -> bytes (GiB/MiB/KiB/TiB binary, GB/MB/KB/TB decimal, a bare K/M/G/T
    binary as nvidia-smi and torch print them). A unit is required."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or not m.group(2):
        raise MemplanError(f"bad size {text!r}: give a number and a unit, e.g. 24GiB, 24GB or 512MiB")
    unit = m.group(2)
    if unit not in _UNITS:
        raise MemplanError(f"bad size {text!r}: unknown unit {unit!r}; use GiB, GB, MiB, MB, KiB, TiB")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise MemplanError(f"bad size {text!r}: must be positive")
    return int(value)


def parse_margin(text: str, budget_bytes: int) -> int:
    """'5%', '0.05' (a fraction of the budget), '0', or a size ('1GiB') -> bytes."""
    t = str(text).strip().lower()
    try:
        if t.endswith("%"):
            frac = float(t[:-1]) / 100
        elif re.fullmatch(r"[0-9]*\.?[0-9]+", t):
            frac = float(t)
            if frac >= 1:
                raise MemplanError(f"bad margin {text!r}: a bare number is a fraction of the budget (< 1); "
                                   "add a unit for a size, e.g. 1GiB")
        else:
            return _check_margin(parse_size(t), budget_bytes, text)
    except ValueError:
        raise MemplanError(f"bad margin {text!r}: give a percentage (5%), a fraction (0.05) or a size (1GiB)") from None
    if not 0 <= frac < 1:
        raise MemplanError(f"bad margin {text!r}: must be between 0% and 100%")
    return _check_margin(int(frac * budget_bytes), budget_bytes, text)


def _check_margin(margin: int, budget: int, text: str) -> int:
    if margin >= budget:
        raise MemplanError(f"margin {text!r} leaves nothing of the {budget / GIB:.2f} GiB budget")
    return margin


@dataclass(frozen=True)
class Budget:
    total_bytes: int
    margin_bytes: int
    label: str  # the GPU name, or the --budget text
    host_link: str = ""  # the GPU's link to host memory (catalog), for offloading / paging costs
    host_link_gbs: float = 0.0
    host_ram_bytes: int | None = None  # --host-ram (default: what `memplan env` sees); None: not judged

    @property
    def usable_bytes(self) -> int:
        return self.total_bytes - self.margin_bytes

    def to_dict(self) -> dict:
        return {"label": self.label, "total_bytes": self.total_bytes, "margin_bytes": self.margin_bytes,
                "usable_bytes": self.usable_bytes, "host_link": self.host_link, "host_link_gbs": self.host_link_gbs,
                "host_ram_bytes": self.host_ram_bytes}


def make_budget(gpu: str | None = None, budget: str | None = None, margin: str | None = None,
                host_ram: str | None = None) -> Budget:
    """From `--gpu NAME` or `--budget SIZE` (exactly one), `--margin`, and `--host-ram` (a size or a number of
    GiB; default: the host RAM this machine has, as `memplan env` reports it)."""
    if bool(gpu) == bool(budget):
        raise MemplanError("give exactly one of --gpu NAME or --budget SIZE (e.g. --budget 24GiB)")
    link, gbs = "", 0.0
    if gpu:
        from memplan.catalog import resolve_gpu

        g = resolve_gpu(gpu)
        total, label, link, gbs = g.memory_bytes, g.name, g.host_link, g.host_link_gbs
    else:
        total, label = parse_size(budget), f"budget {budget.strip()}"
    return Budget(total, parse_margin(margin if margin is not None else DEFAULT_MARGIN, total), label, link, gbs,
                  host_ram_bytes(host_ram))


def host_ram_bytes(text: str | None) -> int | None:
    """--host-ram: '64' (GiB) or a size ('64GiB', '128GB'); default: this machine's RAM (/proc/meminfo MemTotal,
    what `memplan env` reports via psutil), None where it cannot be read."""
    if text is not None:
        t = str(text).strip()
        return parse_size(t + "GiB" if re.fullmatch(r"[0-9]*\.?[0-9]+", t) else t)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------- the search


class Searcher:
    """The estimate's device total for one model, memoized, with counts of what the searches covered."""

    def __init__(self, model: ModelSpec, usable_bytes: int, overheads=None, host_bytes: int | None = None):
        from functools import partial

        from memplan.estimate import estimate

        self._estimate = partial(estimate, overheads=overheads)  # a calibration, or None for the defaults
        self.model = model
        self.usable = usable_bytes
        self.host = host_bytes  # host RAM the plan may use (offloaded activations, paged states); None: unjudged
        self.link, self.link_gbs = "", 0.0  # the GPU's host link (set by fit), for offload / paging costs
        self.gpu = ""  # the catalog GPU's name, when the budget is one
        self.cache: dict[TrainSpec, object] = {}
        self.covered = 0  # configurations whose verdict the searches decided (estimated or by monotonicity)
        self._ranges: set = set()

    @property
    def estimated(self) -> int:
        return len(self.cache)

    def est(self, spec: TrainSpec):
        e = self.cache.get(spec)
        if e is None:
            e = self.cache[spec] = self._estimate(self.model, spec)
        return e

    def device(self, spec: TrainSpec) -> int:
        return self.est(spec).device_total_bytes

    def fits(self, spec: TrainSpec) -> bool:
        return self.device(spec) <= self.usable and self.host_fits(spec)

    def host_fits(self, spec: TrainSpec) -> bool:
        return self.host is None or self.host_peak(spec) <= self.host

    def host_peak(self, spec: TrainSpec) -> int:
        return self.est(spec).host.get("peak_bytes", 0)

    def largest(self, spec: TrainSpec, name: str, lo: int, hi: int, step: int = 1) -> int | None:
        """The largest value v of field `name` in lo, lo+step, ..., hi (a multiple-of-step grid) such that the spec
        with v fits and v+step does not (or v = hi), or None when lo does not fit. Brackets exponentially from the
        spec's current value, then bisects."""
        key = (spec.with_(**{name: lo}), name, hi, step)
        if key not in self._ranges:  # the same range searched twice covers nothing new
            self._ranges.add(key)
            self.covered += (hi - lo) // step + 1
        k_lo, k_hi = lo // step, hi // step  # search over k, value = k * step

        def ok(k: int) -> bool:  # k * step >= lo > 0 is all TrainSpec checks of a length, batch or rank
            return self.fits(spec.variant(**{name: k * step}))

        start = min(max(getattr(spec, name) // step, k_lo), k_hi)
        if ok(start):
            good, bad, probe = start, None, start
            while bad is None:  # double up until something fails or the cap fits
                if probe >= k_hi:
                    return k_hi * step
                probe = min(max(2 * probe, probe + 1), k_hi)
                if ok(probe):
                    good = probe
                else:
                    bad = probe
        else:
            bad, good, probe = start, None, start
            while good is None:  # halve down until something fits or the floor fails
                if probe <= k_lo:
                    return None
                probe = max(probe // 2, k_lo)
                if ok(probe):
                    good = probe
                else:
                    bad = probe
        while bad - good > 1:
            mid = (good + bad) // 2
            if ok(mid):
                good = mid
            else:
                bad = mid
        return good * step


# ------------------------------------------------------------------------------------------------ the changes


@dataclass
class Option:
    key: str  # stable id: checkpointing, optimizer-8bit, paged-optimizer, weights-8bit, weights-4bit, ...
    label: str  # what to do, in words
    change: dict  # TrainSpec fields -> new values
    device_total_bytes: int
    fits: bool
    cost: str
    source: str
    tier: int
    extra: dict = field(default_factory=dict)  # e.g. gradient_accumulation_steps

    def to_dict(self) -> dict:
        d = {"key": self.key, "label": self.label, "change": _jsonable(self.change),
             "device_total_bytes": self.device_total_bytes, "fits": self.fits, "cost": self.cost,
             "source": self.source, "tier": self.tier}
        d.update(self.extra)
        return d


def _jsonable(change: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in change.items()}


# (key, cost in words, its source). TIERS order is the ranking: cheapest first.
COSTS = {
    "sdpa": ("none: the fused kernels are also faster than eager attention",
             "Dao et al. 2022, FlashAttention; PyTorch scaled_dot_product_attention"),
    "flash-attention-2": ("none: flash-attn is the fastest exact attention; needs the flash-attn package (CUDA, "
                          "Ampere or newer) and fp16/bf16",
                          "Dao 2023, FlashAttention-2; transformers attn_implementation='flash_attention_2'"),
    "fused-loss": ("none: the same loss, computed in chunks without b·s·V logits (Liger reports higher throughput)",
                   "Hsu et al. 2024, Liger Kernel (LigerFusedLinearCrossEntropyLoss); Wijmans et al. 2024, Cut "
                   "Cross-Entropy"),
    "offload-checkpoints": ("PCIe traffic: each checkpointed layer input to pinned host RAM and back",
                            "transformers activation_checkpointing_enable(offload=True) (save_on_cpu)"),
    "offload-all": ("PCIe traffic: saved activations to pinned host RAM and back, overlapped on a side stream",
                    "TRL SFTConfig(activation_offloading=True): OffloadActivations (torchtune's design)"),
    "checkpointing": ("about one extra forward per step: ≈ +33% step compute",
                      "Chen et al. 2016, Training Deep Nets with Sublinear Memory Cost"),
    "optimizer-8bit": ("none measured: 8-bit AdamW matches 32-bit AdamW quality",
                       "Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization"),
    "paged-optimizer": ("time only under memory pressure: the driver evicts the states to host RAM and pages them "
                        "back for step(); the device total shown is the floor with them evicted",
                        "Dettmers et al. 2023, QLoRA §3 (paged optimizers)"),
    "lora-instead-of-full": ("LoRA on all linear layers approaches full fine-tuning quality",
                             "Hu et al. 2021, LoRA; Dettmers et al. 2023, QLoRA §4"),
    "weights-8bit": ("LLM.int8() keeps 16-bit quality; its int8 matmuls are slower than 16-bit",
                     "Dettmers et al. 2022, LLM.int8()"),
    "weights-4bit": ("NF4 + LoRA matches 16-bit LoRA quality; dequantizing every weight slows the step",
                     "Dettmers et al. 2023, QLoRA (Tables 3-4)"),
    "lora-rank": ("little: with all linear layers adapted, rank barely changes quality",
                  "Dettmers et al. 2023, QLoRA §4 (LoRA r)"),
    "lora-targets": ("quality: adapting fewer modules falls short of all-linear LoRA",
                     "Dettmers et al. 2023, QLoRA §4 (all linear layers needed to match full fine-tuning)"),
    "lora-dropout": ("the adapters' dropout regularization", "not quantified"),
    "no-upcast": ("unquantized weights (embeddings, norms, MoE experts), activations and logits stay 16-bit "
                  "instead of fp32: less numerically stable",
                  "PEFT prepare_model_for_kbit_training; not quantified"),
    "shard-gpus": ("more GPUs, and bytes on the interconnect each step (below); no change to the training",
                   "torch FSDP2 fully_shard / DeepSpeed ZeRO-3 (Rajbhandari et al. 2020, §7: 1.5x DDP's traffic)"),
    "offload": ("host RAM (below) and step time: optimizer steps / weights cross PCIe every step",
                "Ren et al. 2021, ZeRO-Offload; torch FSDP CPUOffload"),
    "micro-batch": ("throughput only: same effective batch and gradients, smaller kernels, more steps",
                    "gradient accumulation is the mean over the same examples"),
    "shorter-context": ("data: longer sequences are truncated or split, losing long-range training signal",
                        "not quantified"),
}
TIERS = ["sdpa", "flash-attention-2", "fused-loss", "checkpointing", "optimizer-8bit", "offload-checkpoints",
         "paged-optimizer", "offload-all", "lora-instead-of-full", "weights-8bit", "weights-4bit", "shard-gpus",
         "offload", "lora-rank", "micro-batch", "lora-targets", "lora-dropout", "no-upcast", "shorter-context"]

_SMALLER_TARGETS = {"all-linear": ["attn", "qv"], "attn": ["qv"]}
_OPT_8BIT = {"adamw": "adamw-8bit", "paged-adamw": "paged-adamw-8bit"}
_OPT_PAGED = {"adamw": "paged-adamw", "adamw-8bit": "paged-adamw-8bit"}


# flash-attn 2 builds for Ampere, Ada and Hopper GPUs only (Dao-AILab/flash-attention README, "Installation and
# features": Turing / Volta are not supported)
NO_FLASH_ATTN_2 = {"t4", "v100-16gb", "v100-32gb", "mi250x", "mi300x"}


def _variants(key: str, spec: TrainSpec, gpu: str = "") -> list[tuple[str, dict]]:
    """The discrete variants of a change, least given up first (empty when it does not apply)."""
    if key == "sdpa" and spec.attention == "eager":
        return [("SDPA attention (fused kernels)", {"attention": "sdpa"})]
    if key == "flash-attention-2" and spec.attention != "flash_attention_2" and spec.compute_dtype != "fp32" \
            and spec.bits != 32 and gpu not in NO_FLASH_ATTN_2:
        return [("flash_attention_2 attention", {"attention": "flash_attention_2"})]
    if key == "fused-loss" and spec.loss == "standard" and "lm_head" not in spec.modules_to_save:
        return [("fused linear cross-entropy (Liger)", {"loss": "liger"})]
    if key == "offload-checkpoints" and spec.gradient_checkpointing and spec.activation_offload == "off":
        return [("offload checkpointed layer inputs to host RAM", {"activation_offload": "checkpoints"})]
    if key == "offload-all" and spec.activation_offload != "all":
        return [("offload all saved activations to host RAM (TRL)", {"activation_offload": "all"})]
    if key == "checkpointing" and not spec.gradient_checkpointing:
        return [("gradient checkpointing on", {"gradient_checkpointing": True})]
    if key == "optimizer-8bit" and spec.optimizer in _OPT_8BIT:
        return [(f"8-bit optimizer ({_OPT_8BIT[spec.optimizer]})", {"optimizer": _OPT_8BIT[spec.optimizer]})]
    if key == "paged-optimizer" and spec.optimizer in _OPT_PAGED:
        return [(f"paged optimizer ({_OPT_PAGED[spec.optimizer]})", {"optimizer": _OPT_PAGED[spec.optimizer]})]
    if key == "lora-instead-of-full" and spec.method == "full":
        return [("LoRA r=16 on all linear layers instead of full fine-tuning",
                 {"method": "lora", "lora_r": 16, "lora_targets": "all-linear"})]
    lora = spec.method == "lora"
    if key == "weights-8bit" and lora and spec.bits > 8:
        return [("8-bit base weights (LLM.int8)", {"bits": 8})]
    if key == "weights-4bit" and lora and spec.bits > 4:
        return [("4-bit NF4 base weights (QLoRA)", {"bits": 4, "quant_type": "nf4", "double_quant": True})]
    if key == "lora-targets" and lora and isinstance(spec.lora_targets, str):
        return [(f"LoRA on {t} modules only", {"lora_targets": t}) for t in _SMALLER_TARGETS.get(spec.lora_targets, [])]
    if key == "lora-dropout" and lora and spec.lora_dropout > 0:
        return [("LoRA dropout 0", {"lora_dropout": 0.0})]
    if key == "no-upcast" and spec.upcast_applies:
        return [("no fp32 upcast (--upcast off)", {"upcast": False})]
    if key in ("shard-gpus", "offload"):
        return [(label, change) for label, change in
                (_shard_variants(spec) if key == "shard-gpus" else _offload_variants(spec)) if _valid(spec, change)]
    return []


def _valid(spec: TrainSpec, change: dict) -> bool:
    try:
        spec.with_(**change)
    except MemplanError:
        return False
    return True


SHARD_COUNTS = (2, 4, 8)


def _shard_variants(spec: TrainSpec) -> list[tuple[str, dict]]:
    """Shard over more GPUs of the same kind: FSDP2 FULL_SHARD, then DeepSpeed ZeRO-3, fewest GPUs first."""
    from memplan.spec import SHARDED_WEIGHTS

    if spec.bits == 8 or spec.offload != "none":
        return []  # LLM.int8 weights cannot be sharded (spec.py)
    out = []
    for n in SHARD_COUNTS:
        if n <= spec.gpus and spec.strategy in SHARDED_WEIGHTS:
            continue
        for strategy, name in (("fsdp", "FSDP2 FULL_SHARD"), ("zero3", "DeepSpeed ZeRO-3")):
            out.append((f"shard over {max(n, spec.gpus)} GPUs ({name})",
                        {"gpus": max(n, spec.gpus), "parallel": strategy, "quant_storage": "auto"}))
    return out


def _offload_variants(spec: TrainSpec) -> list[tuple[str, dict]]:
    """CPU offload on the GPUs already in use: ZeRO-Offload of the optimizer, then parameters too."""
    if spec.bits == 8 or spec.offload == "params":
        return []
    s = spec.strategy
    out = []
    if spec.offload == "none" and s in ("none", "ddp", "zero1", "zero2", "zero3"):
        z = "zero2" if s in ("none", "ddp", "zero1") else s
        out.append(("offload optimizer states to CPU (DeepSpeed ZeRO-Offload)", {"parallel": z, "offload": "optimizer"}))
    if s in ("fsdp", "fsdp-grad-op", "zero3") or s == "none":
        p = "zero3" if s in ("none", "zero3") else s
        out.append(("offload parameters and optimizer to CPU (ZeRO-3 offload_param / FSDP CPUOffload)",
                    {"parallel": p, "offload": "params", "quant_storage": "auto"}))
    return out


def parallel_cost(est) -> str:
    """What a multi-GPU or offload change costs, from the estimate: bytes on the wire per step, host RAM."""
    p = est.parallel
    if not p:
        return ""
    out = [f"{p['gpus']} GPU(s), {p['comm_bytes_per_step'] / GIB:,.2f} GiB sent per GPU per step (ring collectives)"]
    if est.host_bytes:
        out.append(f"{est.host_bytes / GIB:,.2f} GiB host RAM per node")
    return "; ".join(out)


def _searched(s: Searcher, key: str, spec: TrainSpec) -> tuple[str, dict, dict] | None:
    """A searched change at its least aggressive fitting value, or None when no value in range fits."""
    if key == "lora-rank" and spec.method == "lora" and spec.lora_r > 1:
        r = s.largest(spec, "lora_r", 1, spec.lora_r - 1)
        return (f"LoRA rank {r}", {"lora_r": r}, {}) if r else None
    if key == "micro-batch" and spec.batch_size > 1:
        b = s.largest(spec, "batch_size", 1, spec.batch_size - 1)
        if not b:
            return None
        b = max(d for d in range(1, b + 1) if spec.batch_size % d == 0)  # a divisor: the same effective batch
        acc = spec.batch_size // b
        return (f"micro-batch {b} × {acc} gradient-accumulation steps", {"batch_size": b},
                {"gradient_accumulation_steps": acc, "effective_batch": spec.batch_size})
    if key == "shorter-context" and spec.seq_len > SEQ_STEP:
        hi = (spec.seq_len - 1) // SEQ_STEP * SEQ_STEP
        seq = s.largest(spec, "seq_len", SEQ_STEP, hi, SEQ_STEP) if hi >= SEQ_STEP else None
        return (f"sequence length {seq}", {"seq_len": seq}, {}) if seq else None
    return None


def _searched_floor(key: str, spec: TrainSpec) -> list[tuple[str, dict]]:
    """What a searched change sets when no value fits on its own: [] when it does not apply or changes nothing."""
    if key == "lora-rank" and spec.method == "lora" and spec.lora_r > RANK_FLOOR:
        return [(f"LoRA rank {RANK_FLOOR}", {"lora_r": RANK_FLOOR})]
    if key == "micro-batch" and spec.batch_size > 1:
        return [(f"micro-batch 1 × {spec.batch_size} gradient-accumulation steps", {"batch_size": 1})]
    if key == "shorter-context" and spec.seq_len > SEQ_STEP:
        return [(f"sequence length {SEQ_STEP}", {"seq_len": SEQ_STEP})]
    return []


def options(s: Searcher, spec: TrainSpec) -> list[Option]:
    """Every single change that applies, ranked cheapest first; for each, its least aggressive variant that fits,
    or its most aggressive one when none does."""
    out = []
    for tier, key in enumerate(TIERS):
        cost, source = COSTS[key]
        found = _searched(s, key, spec)
        if found:
            label, change, extra = found
            new = spec.with_(**change)
            out.append(Option(key, label, change, s.device(new), True, cost, source, tier, extra))
            continue
        variants = _variants(key, spec, s.gpu) + _searched_floor(key, spec)
        chosen = None
        for label, change in variants:
            new = spec.with_(**change)
            chosen = (label, change, new)
            if s.fits(new):
                break
        if chosen:
            label, change, new = chosen
            device, fits = s.device(new), s.fits(new)
            if key == "paged-optimizer":  # the states can leave the device: judge the floor (estimate/host.py)
                paged = s.est(new).paging or {}
                device = paged.get("floor_device_total_bytes", device)
                fits = device <= s.usable and s.host_fits(new)
            cost = _link_cost(s, key, new, cost)
            if key in ("shard-gpus", "offload"):
                cost = f"{cost}: {parallel_cost(s.est(new))}"
            out.append(Option(key, label, change, device, fits, cost, source, tier))
    return out


def _link_cost(s: Searcher, key: str, spec: TrainSpec, cost: str) -> str:
    """Offloading and paging cost host-link time: bytes per step, and seconds at the GPU's link bandwidth."""
    if key not in ("offload-checkpoints", "offload-all", "paged-optimizer"):
        return cost
    e = s.est(spec)
    if key == "paged-optimizer":
        moved = (e.paging or {}).get("pcie_bytes_per_step_at_floor", 0)
    else:
        moved = e.host.get("pcie_to_host_bytes_per_step", 0) + e.host.get("pcie_to_device_bytes_per_step", 0)
    text = f"{cost}: {moved / GIB:.2f} GiB per step over the host link"
    if s.link_gbs:
        text += f", ≥ {moved / (s.link_gbs * 1e9):.2f} s at {s.link} ({s.link_gbs:g} GB/s per direction)"
    host = e.host.get("peak_bytes", 0)
    text += f"; pinned/host RAM {host / GIB:.2f} GiB"
    if not s.host_fits(spec):
        text += f" (more than the {s.host / GIB:.0f} GiB host RAM)"
    return text


@dataclass
class Step:
    key: str
    label: str
    change: dict
    device_total_bytes: int
    fits: bool

    def to_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "change": _jsonable(self.change),
                "device_total_bytes": self.device_total_bytes, "fits": self.fits}


def combination(s: Searcher, spec: TrainSpec) -> tuple[list[Step], TrainSpec]:
    """Apply the changes cheapest first, cumulatively, until the configuration fits. Discrete changes go one variant
    at a time (8-bit, then 4-bit weights); searched ones (rank, micro-batch, context) take their largest fitting
    value, or their floor when none fits. Returns the steps and the final spec (which may still not fit)."""
    steps: list[Step] = []
    cur = spec
    for key in TIERS:
        if key == "paged-optimizer":
            continue  # lowers no estimated peak
        found = _searched(s, key, cur)
        if found:
            label, change, _ = found
            cur = cur.with_(**change)
            steps.append(Step(key, label, change, s.device(cur), True))
            return steps, cur
        for label, change in _variants(key, cur, s.gpu) + _searched_floor(key, cur):
            new = cur.with_(**change)
            if s.device(new) >= s.device(cur):
                continue  # e.g. 8-bit weights with the fp32 upcast at long context: more activation bytes
            if not s.host_fits(new) and s.host_peak(new) > s.host_peak(cur):
                continue  # e.g. sharding over a node's GPUs: each rank loads and offloads into the same host RAM
            cur = new
            ok = s.fits(cur)
            steps.append(Step(key, label, change, s.device(cur), ok))
            if ok:
                return steps, cur
    return _without_a_costly_step(s, spec, steps, cur)


def _without_a_costly_step(s: Searcher, spec: TrainSpec, steps: list[Step], cur: TrainSpec):
    """A greedy step can cost what a later one needed (sharding over a node's GPUs multiplies the host RAM that
    loading takes): when the combination does not fit, undo one earlier change if that makes it fit."""
    if s.fits(cur):
        return steps, cur
    for step in steps[:-1]:
        fields = set(step.change)
        try:
            back = cur.with_(**{k: getattr(spec, k) for k in fields})
        except MemplanError:  # a later change needs this one (an --offload needs its sharding strategy)
            continue
        if s.fits(back):
            kept, replay = [], spec
            for st in steps:
                if not fields & set(st.change):
                    replay = replay.with_(**st.change)
                    kept.append(Step(st.key, st.label, st.change, s.device(replay), s.fits(replay)))
            return kept, back
    return steps, cur


# ------------------------------------------------------------------------------------------------- the answer


@dataclass
class Fit:
    model: str
    config: dict
    budget: Budget
    device_total_bytes: int
    peak_bytes: int
    fits: bool
    max_seq_len: int | None  # at the given batch; None when even SEQ_STEP tokens do not fit
    max_seq_len_capped: bool  # True when SEQ_CAP itself fits (the true maximum is larger)
    max_batch_size: int | None  # at the given sequence length
    max_batch_capped: bool
    frontier: list[dict]  # largest sequence length for batch 1, 2, 4, ...
    options: list[Option]
    combination: list[Step]
    combination_fits: bool
    model_max_positions: int | None
    host_bytes: int  # the estimate's host RAM peak (estimate/host.py)
    host_fits: bool
    configurations_searched: int
    estimates: int
    seconds: float
    overhead_source: str = ""  # where the device overheads (allocator, context, workspace) come from

    def to_dict(self) -> dict:
        return {
            "model": self.model, "config": self.config, "budget": self.budget.to_dict(),
            "overhead_source": self.overhead_source,
            "device_total_bytes": self.device_total_bytes, "peak_bytes": self.peak_bytes, "fits": self.fits,
            "headroom_bytes": self.budget.usable_bytes - self.device_total_bytes,
            "seq_len_granularity": SEQ_STEP,
            "max_seq_len": self.max_seq_len, "max_seq_len_capped": self.max_seq_len_capped,
            "max_batch_size": self.max_batch_size, "max_batch_capped": self.max_batch_capped,
            "frontier": self.frontier, "model_max_position_embeddings": self.model_max_positions,
            "host_peak_bytes": self.host_bytes, "host_fits": self.host_fits,
            "options": [o.to_dict() for o in self.options],
            "combination": [st.to_dict() for st in self.combination], "combination_fits": self.combination_fits,
            "configurations_searched": self.configurations_searched, "estimates": self.estimates,
            "seconds": round(self.seconds, 4), "units": "bytes",
            "stack": stack(self.config.get("transformers", 0)),
        }


def max_seq_len(s: Searcher, spec: TrainSpec) -> int | None:
    return s.largest(spec, "seq_len", SEQ_STEP, SEQ_CAP, SEQ_STEP)


def max_batch(s: Searcher, spec: TrainSpec) -> int | None:
    return s.largest(spec, "batch_size", 1, BATCH_CAP)


def fit(model: ModelSpec, train: TrainSpec, budget: Budget, overheads=None) -> Fit:
    t0 = time.perf_counter()
    s = Searcher(model, budget.usable_bytes, overheads, budget.host_ram_bytes)
    s.link, s.link_gbs = budget.host_link, budget.host_link_gbs
    s.gpu = budget.label if budget.host_link else ""
    base = s.est(train)
    fits = s.fits(train)
    seq = max_seq_len(s, train)
    batch = max_batch(s, train)
    frontier = []
    b = 1
    while b <= BATCH_CAP:
        m = max_seq_len(s, train.with_(batch_size=b))
        if m is None:
            break
        frontier.append({"batch_size": b, "max_seq_len": m, "device_total_bytes": s.device(
            train.with_(batch_size=b, seq_len=m))})
        b *= 2
    opts, combo, combo_fits = [], [], fits
    if not fits:
        opts = options(s, train)
        if not any(o.fits for o in opts if o.key != "shorter-context"):  # before giving up data, combine
            combo, final = combination(s, train)
            combo_fits = s.fits(final)
            if not combo_fits:
                raise MemplanError(_too_small(s, model, train, final, budget))
    return Fit(
        model=model.name, config=train.to_dict(), budget=budget, device_total_bytes=base.device_total_bytes,
        peak_bytes=base.peak_bytes, fits=fits, max_seq_len=seq, max_seq_len_capped=seq == SEQ_CAP,
        max_batch_size=batch, max_batch_capped=batch == BATCH_CAP, frontier=frontier, options=opts,
        combination=combo, combination_fits=combo_fits,
        model_max_positions=model.hf_config.get("max_position_embeddings"),
        host_bytes=base.host.get("peak_bytes", 0), host_fits=s.host_fits(train),
        configurations_searched=s.covered + len(TIERS), estimates=s.estimated, seconds=time.perf_counter() - t0,
        overhead_source=base.overhead_source,
    )


def _too_small(s: Searcher, model: ModelSpec, train: TrainSpec, final: TrainSpec, budget: Budget) -> str:
    floor = final.with_(seq_len=SEQ_STEP, batch_size=1)
    e = s.est(floor)
    w = sum(e.components[k] for k in ("weights_quantized", "quant_state", "weights_unquantized"))
    if s.device(floor) <= s.usable and not s.host_fits(floor):
        return (f"{model.name} fits {budget.label}'s memory only with changes whose host RAM exceeds --host-ram "
                f"({s.host_peak(floor) / GIB:.2f} GiB needed, {s.host / GIB:.2f} GiB given; see estimate's host "
                "RAM plan)")
    return (f"{model.name} cannot fit {budget.label} ({budget.usable_bytes / GIB:.2f} GiB usable after the "
            f"{budget.margin_bytes / GIB:.2f} GiB margin): even with every change ({final.bits}-bit weights, "
            f"{final.optimizer}, batch 1 × {SEQ_STEP} tokens) it needs {e.device_total_bytes / GIB:.2f} GiB, "
            f"the weights alone {w / GIB:.2f} GiB")
