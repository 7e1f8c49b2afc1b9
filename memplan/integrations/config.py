"""`--from FILE`: a trainer's config file read into memplan's training settings, with a record of the mapping.

A config is YAML (yaml.safe_load: plain data only, no tags that build objects) or JSON, never a pickle (TRL's
training_args.bin is refused). Its format is recognized from its keys (torchtune's `_component_`, LLaMA-Factory's
model_name_or_path + finetuning_type/cutoff_len, axolotl's base_model, else TRL / transformers TrainingArguments),
and one reader per format (axolotl.py, llamafactory.py, trl.py, torchtune.py) turns its keys into TrainSpec fields.
Each reader applies its trainer's own defaults where they differ from memplan's (TrainingArguments'
per_device_train_batch_size is 8, LLaMA-Factory's lora_rank 8, ...), so the settings are the run the file
describes, not memplan's default recipe.

Every key ends in exactly one list: mapped (key -> setting), recognized but not modelled by memplan (with why), or
ignored (with why). The simple keys of each reader are a table of `Key`s (key -> TrainSpec field, converter, the
trainer's default, why), applied by `Reader.apply`; the rest (adapters and bits, targets, DeepSpeed / FSDP) are
small functions. A key of the wrong type, an unknown optimizer or target, or a contradiction (4-bit and 8-bit both
on) is one line naming the key and the file (MemplanError, exit 2). Command-line flags override the file: an
unmodelled value (an optimizer memplan has no formula for) is an error only when no flag replaces it.

The GPU count is never in these files (it is the launcher's: `accelerate launch --num_processes`, `torchrun
--nproc_per_node`, `deepspeed --num_gpus`, `axolotl train --num-processes`): a file that asks for DeepSpeed or FSDP
needs `--gpus N` on the command line (one line saying so otherwise; `--parallel` on the command line replaces the
file's strategy and lifts it), and the estimate is per rank of those N.
"""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from memplan.errors import MemplanError
from memplan.spec import TrainSpec

FORMATS = ("axolotl", "llamafactory", "trl", "torchtune")
MAX_BYTES = 4 * 2**20  # a training config is a few KiB

# transformers TrainingArguments.optim (transformers/training_args.py OptimizerNames, v5.24) -> memplan optimizer.
# Used by axolotl (`optimizer`), LLaMA-Factory and TRL (`optim`).
HF_OPTIMIZERS = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw_apex_fused": "adamw",
    "adamw_torch_xla": "adamw", "adamw_torch_npu_fused": "adamw",
    "adamw_bnb_8bit": "adamw-8bit", "adamw_8bit": "adamw-8bit",
    "paged_adamw_32bit": "paged-adamw", "paged_adamw": "paged-adamw",
    "paged_adamw_8bit": "paged-adamw-8bit",
    "sgd": "sgd", "adafactor": "adafactor",
}
# Known names memplan has no formula for (their states differ from every modelled optimizer).
HF_UNMODELLED = {
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "ademamix_8bit", "adagrad",
    "lion_8bit", "lion_32bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
    "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
    "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
    "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
    "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw",
    # axolotl's own (axolotl/utils/schemas/enums.py CustomSupportedOptimizers, v0.19)
    "optimi_adamw", "ao_adamw_4bit", "ao_adamw_8bit", "ao_adamw_fp8", "adopt_adamw", "adamc", "came_pytorch",
    "muon", "dion", "sinkgd", "polora", "flash_adamw", "flash_adam", "flash_sgd", "flash_sgdw", "flash_lion",
    "q_galore_adamw8bit",
}
FUSED_NOTE = ("fused / foreach AdamW keep the same states; memplan models torch's foreach AdamW, whose step "
              "temporaries the fused kernel does not allocate (estimate high by at most those)")


def _kind_name(kind) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(kind, getattr(kind, "__name__", str(kind)))


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Mapping:
    """A config file read into TrainSpec settings, and what happened to each key."""

    path: str
    format: str
    model: str | None = None  # the model reference the config names (resolved like a MODEL argument)
    model_key: str | None = None
    settings: dict = field(default_factory=dict)  # TrainSpec field -> value
    keys: dict = field(default_factory=dict)  # TrainSpec field -> the config key(s) it came from
    rows: list = field(default_factory=list)  # (key, value as written, setting) mapped
    pending: list = field(default_factory=list)  # (key, value, why) recognized, not modelled by memplan
    ignored: list = field(default_factory=list)  # (key, why)
    deferred: dict = field(default_factory=dict)  # field -> error unless the command line sets the field
    waivers: dict = field(default_factory=dict)  # field -> other fields whose flag also lifts its deferred error
    given: dict = field(default_factory=dict)  # the training flags of the command line (resolve)
    notes: list = field(default_factory=list)
    data: dict = field(default_factory=dict)  # dataset hints: text_field, packing, order, max_length, ...
    overridden: list = field(default_factory=list)  # (field, config value, command-line value)
    read: list = field(default_factory=list)  # (key, value) read with no row of their own (dataset hints, off flags)

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "model": self.model, "settings": self.spec_dict(),
                "mapped": [{"key": k, "value": v, "setting": s} for k, v, s in self.rows],
                "not_modelled": [{"key": k, "value": v, "why": w} for k, v, w in self.pending],
                "ignored": [{"key": k, "why": w} for k, w in self.ignored],
                "overridden": [{"setting": f, "config": c, "command_line": v} for f, c, v in self.overridden],
                "read": [{"key": k, "value": v} for k, v in self.read],
                "notes": list(self.notes), "dataset": dict(self.data)}

    def spec_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.settings.items()}


class Reader:
    """The raw config and the Mapping being built: typed access that records every key it reads."""

    def __init__(self, data: dict, path: str, fmt: str):
        self.raw = data
        self.path = path
        self.m = Mapping(path=path, format=fmt)
        self.used: set[str] = set()

    # ---- reading
    def error(self, key: str, message: str) -> MemplanError:
        return MemplanError(f"{self.path}: {key}: {message}")

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def get(self, key: str, kind, default=None, where: dict | None = None, prefix: str = ""):
        """The value of `key` checked against `kind` (a type or a tuple of types); `default` when absent/null."""
        src = self.raw if where is None else where
        name = prefix + key
        if where is None:
            self.used.add(key)
        value = src.get(key)
        if value is None:
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = any(_is(value, k) for k in kinds)
        if not ok:
            raise self.error(name, f"expected {' or '.join(_kind_name(k) for k in kinds)}, got {_show(value)!r}")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value) if int not in kinds else value
        return value

    def positive(self, key: str, default=None, where: dict | None = None, prefix: str = ""):
        value = self.get(key, int, default, where, prefix)
        if value is not None and value <= 0:
            raise self.error(prefix + key, f"must be a positive integer, got {value}")
        return value

    # ---- recording
    def set(self, setting: str, value, key: str, shown=None, note: str = "") -> None:
        """A TrainSpec field this memplan has, from `key` (its value as written: `shown`)."""
        self.m.settings[setting] = value
        self.m.keys[setting] = key
        text = f"{setting} {_show(value if not isinstance(value, tuple) else '+'.join(value))}"
        self.m.rows.append((key, _show(shown) if shown is not None else "(not set)",
                            text + (f" ({note})" if note else "")))

    def apply(self, keys, where: dict | None = None, prefix: str = "") -> dict:
        """Each `Key` of the table: its value (or the trainer's default) converted and set. Returns field -> value
        of the keys that set something."""
        src = self.raw if where is None else where
        out = {}
        for k in keys:
            if where is None:
                self.used.add(k.key)
            value = src.get(k.key)
            default = k.default(self.m.settings) if callable(k.default) else k.default
            if value is None and default is None:
                continue
            try:
                setting = k.convert(value if value is not None else default) if k.convert else value
            except ValueError as e:
                raise self.error(prefix + k.key, str(e)) from None
            if setting is None:  # an off switch: read, nothing to set
                continue
            shown = value if value is not None else (k.origin or f"(default {_show(default)})")
            self.set(k.field, setting, prefix + k.key, shown, k.why)
            out[k.field] = setting
        return out

    def not_modelled(self, key: str, why: str, shown=None) -> None:
        self.used.add(key)
        self.m.pending.append((key, _show(shown if shown is not None else self.raw.get(key, "")), why))

    def defer(self, setting: str, key: str, message: str, waived_by: tuple = ()) -> None:
        """An error raised only if the command line sets neither `setting` nor a field of `waived_by`."""
        self.m.deferred[setting] = f"{self.path}: {key}: {message}"
        self.m.keys.setdefault(setting, key)
        if waived_by:
            self.m.waivers[setting] = tuple(waived_by)

    def ignore(self, key: str, why: str) -> None:
        self.used.add(key)
        self.m.ignored.append((key, why))

    def finish(self, reasons: dict[str, str], default_why: str) -> Mapping:
        """Every key not read yet goes to `ignored`, with the reason its table gives or `default_why`."""
        def roots(key: str) -> set[str]:  # "a.b" -> a; "x+y" and "x/y" (one row from several keys) -> x, y
            return {part.split(".")[0] for part in re.split(r"[+/]", key)}

        shown = set().union(*(roots(k) for k, _, _ in self.m.rows), *(roots(k) for k, _, _ in self.m.pending),
                            roots(self.m.model_key or ""))
        for key in self.raw:
            if key in self.used and key not in shown and self.raw[key] is not None:
                self.m.read.append((key, _show(self.raw[key])))
            elif key in self.used and key not in shown:
                self.m.ignored.append((key, "null: the trainer's default applies"))
            if key not in self.used:
                self.m.ignored.append((key, reasons.get(key) or _prefix_reason(key, reasons) or default_why))
        check_contradictions(self)
        return self.m


def _is(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _prefix_reason(key: str, reasons: dict[str, str]) -> str | None:
    for k, why in reasons.items():
        if k.endswith("*") and key.startswith(k[:-1]):
            return why
    return None


@dataclass(frozen=True)
class Key:
    """One config key onto one TrainSpec field (Reader.apply)."""

    key: str
    field: str
    convert: Callable | None = None  # raw value -> setting; ValueError(why) for a bad value; None: nothing to set
    default: object = None  # the trainer's default when the key is absent (a callable: of the settings so far)
    why: str = ""  # shown next to the setting: where its meaning comes from
    origin: str = ""  # how an absent key is shown, e.g. "(axolotl default 512)"


def positive(value) -> int:
    if not _is(value, int):
        raise ValueError(f"expected an integer, got {_show(value)!r}")
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def dropout(value) -> float:
    if not _is(value, float):
        raise ValueError(f"expected a number, got {_show(value)!r}")
    if not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1), got {value}")
    return float(value)


def boolean(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)!r}")  # noqa: TRY004 - the converters' contract
    return value


def when_on(setting):
    """A switch: `setting` when it is true, nothing when false."""
    def convert(value):
        return setting if boolean(value) else None
    return convert


def check_contradictions(r: Reader) -> None:
    s = r.m.settings
    if s.get("method") == "full" and s.get("bits") in (4, 8):
        raise r.error(r.m.keys.get("bits", "bits"), "4/8-bit weights are frozen (bitsandbytes): they cannot be "
                      f"fully fine-tuned ({r.m.keys.get('method')} says full)")


def optimizer_from_hf(r: Reader, key: str, name: str) -> None:
    """A transformers/axolotl optimizer name onto memplan's optimizer (HF_OPTIMIZERS)."""
    low = name.strip().lower()
    if low in HF_OPTIMIZERS:
        note = FUSED_NOTE if low in ("adamw_torch_fused", "adamw_apex_fused", "adamw_torch_npu_fused") else ""
        r.set("optimizer", HF_OPTIMIZERS[low], key, name, note)
    elif low in HF_UNMODELLED:
        r.not_modelled(key, f"optimizer {name!r}: memplan has no formula for its states", name)
        r.defer("optimizer", key, f"optimizer {name!r} is not modelled by memplan (it models "
                f"{', '.join(sorted(set(HF_OPTIMIZERS)))}); pass --optimizer to estimate with one of those")
    else:
        raise r.error(key, f"unknown optimizer {name!r}; known: {', '.join(sorted(HF_OPTIMIZERS))}")


def attention_from_hf(r: Reader, key: str, impl: str, shown=None) -> None:
    """transformers' attn_implementation (or a trainer's switch for one: `shown` is how the file says it)."""
    low = impl.strip().lower()
    shown = impl if shown is None else shown
    if low in ("sdpa", "eager"):
        r.set("attention", low, key, shown)
    elif low == "flash_attention_2":
        r.set("attention", "flash_attention_2", key, shown, "attn_implementation flash_attention_2: flash-attn's "
              "kernels")
    else:
        r.not_modelled(key, f"attention {impl!r}: not modelled; the estimate uses sdpa (O(s) fused kernels)", impl)


def compute_dtype(r: Reader, bf16, fp16, bf16_key="bf16", fp16_key="fp16", default: str = "fp32",
                  shown=None) -> None:
    """HF-style bf16 / fp16 flags (mixed precision) onto the compute dtype (`shown`: how the file says it)."""
    if bf16 is True and fp16 is True:
        raise r.error(f"{bf16_key}/{fp16_key}", "bf16 and fp16 are both on; choose one")
    if bf16 in (True, "auto"):
        r.set("compute_dtype", "bf16", bf16_key, shown if shown is not None else bf16,
              "'auto' means bf16 where the GPU supports it" if bf16 == "auto" else "")
    elif fp16 is True:
        r.set("compute_dtype", "fp16", fp16_key, fp16)
    elif default != "bf16":
        r.set("compute_dtype", default, bf16_key, bf16 if bf16 is not None else "(not set)",
              "neither bf16 nor fp16 on: fp32 compute")


def lora_targets_from_names(r: Reader, key: str, names: list[str]) -> None:
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise r.error(key, f"expected a non-empty list of module names, got {_show(names)!r}")
    clean = tuple(dict.fromkeys(n.strip() for n in names))
    if clean in (("all-linear",), ("all_linear",), ("all",)):
        r.set("lora_targets", "all-linear", key, names)
    else:
        r.set("lora_targets", clean, key, names, "checked against the model's linear names")


LAUNCHER = ("the GPU count is the launcher's, not the file's (accelerate launch --num_processes, torchrun "
            "--nproc_per_node, deepspeed --num_gpus, axolotl train --num-processes)")


# --------------------------------------------------------------------------------------------- reading files

def load_file(path: str) -> dict:
    p = Path(path).expanduser()
    if p.is_dir():
        raise MemplanError(f"--from {path!r} is a directory; give a trainer config file (YAML or JSON)")
    if not p.is_file():
        raise MemplanError(f"--from {path!r}: no such file")
    if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"):
        raise MemplanError(f"--from {path!r}: a pickle file is never read (it can run code); save the arguments "
                           "as JSON: json.dump(training_args.to_dict(), open('args.json', 'w'))")
    if p.stat().st_size > MAX_BYTES:
        raise MemplanError(f"--from {path!r}: {p.stat().st_size:,} bytes is not a training config")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise MemplanError(f"--from {path!r}: not a text file (YAML or JSON)") from None
    except OSError as e:
        raise MemplanError(f"--from {path!r}: cannot read: {e.strerror}") from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MemplanError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    else:
        import yaml

        try:
            aliases = sum(isinstance(t, yaml.AliasToken) for t in yaml.scan(text))
            if aliases > 100:  # a config has a few; thousands are an alias bomb (exponential expansion)
                raise MemplanError(f"{path}: {aliases} YAML aliases: not a training config")
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise MemplanError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise MemplanError(f"{path}: a training config must be a mapping of keys, got "
                           f"{type(data).__name__ if data is not None else 'an empty file'}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise MemplanError(f"{path}: key {bad[0]!r} is not a string")
    return data


def detect(data: dict, path: str) -> str:
    def component(v) -> bool:
        return isinstance(v, dict) and "_component_" in v

    if any(component(v) for v in data.values()):
        return "torchtune"
    if "model_name_or_path" in data and any(k in data for k in ("finetuning_type", "cutoff_len", "stage",
                                                                "template", "lora_target", "quantization_bit")):
        return "llamafactory"
    if "base_model" in data:
        return "axolotl"
    from memplan.integrations.trl import KNOWN_KEYS

    if any(k in KNOWN_KEYS for k in data):
        return "trl"
    raise MemplanError(f"{path}: not a trainer config memplan reads (axolotl: base_model; LLaMA-Factory: "
                       "model_name_or_path + finetuning_type; TRL/TrainingArguments: per_device_train_batch_size, "
                       "optim, ...; torchtune: _component_ entries)")


def read_config(path: str) -> Mapping:
    """The Mapping of a trainer config file (format detected from its keys)."""
    import importlib

    data = load_file(path)
    fmt = detect(data, path)
    module = importlib.import_module(f"memplan.integrations.{fmt}")
    mapping = module.read(Reader(data, str(path), fmt))
    return mapping


# ------------------------------------------------------------------------------------- flags override the file

def flag_of(setting: str) -> str:
    from memplan.options import FLAGS

    return next((f for f, name, _, _ in FLAGS if name == setting), "--" + setting.replace("_", "-"))


def resolve(mapping: Mapping, given: dict) -> None:
    """Apply command-line precedence: `given` holds the flags the user gave (TrainSpec field -> raw text).
    Deferred errors of fields no flag sets are raised now."""
    for setting, value in list(mapping.settings.items()):
        if setting in given:
            mapping.overridden.append((setting, _show(value), given[setting]))
    mapping.given = dict(given)
    for setting, message in mapping.deferred.items():
        if setting not in given and not any(w in given for w in mapping.waivers.get(setting, ())):
            raise MemplanError(message)


def print_mapping(mapping: Mapping, out=None) -> None:
    """The mapping, for people: which key became which setting, what the command line overrode, what was not
    modelled and what was ignored (and why). To stderr, so that --json output stays clean."""
    out = out or sys.stderr
    names = {"axolotl": "axolotl", "llamafactory": "LLaMA-Factory", "trl": "TRL / transformers TrainingArguments",
             "torchtune": "torchtune"}
    w = max([len(k) for k, _, _ in mapping.rows] + [len(k) for k, _, _ in mapping.pending] + [10])
    w = min(w, 34)
    print(f"--from {mapping.path} ({names[mapping.format]} config)", file=out)
    if mapping.model:
        print(f"  {mapping.model_key:<{w}}  {_show(mapping.model)}  -> model", file=out)
    over = {f for f, _, _ in mapping.overridden}
    for key, value, setting in mapping.rows:
        field_name = setting.split(" ", 1)[0]
        mark = "  [overridden on the command line]" if field_name in over else ""
        print(f"  {key:<{w}}  {value}  -> {setting}{mark}", file=out)
    if "gpus" in mapping.deferred and "gpus" in mapping.given:
        print(f"  {'(GPU count)':<{w}}  not in the file  -> gpus {mapping.given['gpus']} (--gpus; {LAUNCHER}): "
              "the estimate is per rank", file=out)
    for f, conf, cli in mapping.overridden:
        print(f"  command line: {flag_of(f)} {cli} (the config says {conf})", file=out)
    if mapping.pending:
        print("  recognized, not modelled by memplan:", file=out)
        for key, value, why in mapping.pending:
            print(f"    {key}{' = ' + value if value else ''}: {why}", file=out)
    if mapping.read:
        print("  also read (dataset steps, or off): " + ", ".join(f"{k}={v}" for k, v in mapping.read), file=out)
    for note in mapping.notes:
        print(f"  note: {note}", file=out)
    if mapping.ignored:
        groups: dict[str, list[str]] = {}
        for key, why in mapping.ignored:
            groups.setdefault(why, []).append(key)
        print("  ignored:", file=out)
        for why, keys in groups.items():
            print(f"    {', '.join(keys)}: {why}", file=out)


def check_targets(mapping: Mapping, model, given: dict) -> None:
    """LoRA target names from the config must name linears of the model (an unknown target is an error naming
    the key and the file), unless --lora-targets replaces them."""
    targets = mapping.settings.get("lora_targets")
    if "lora_targets" in given or not isinstance(targets, tuple) or mapping.settings.get("method") == "full":
        return
    from memplan.recipe import lora_targets

    try:
        lora_targets(model, TrainSpec(lora_targets=targets))
    except MemplanError as e:
        raise MemplanError(f"{mapping.path}: {mapping.keys.get('lora_targets', 'lora targets')}: "
                           f"{str(e).replace('lora-targets: ', '')}") from None
