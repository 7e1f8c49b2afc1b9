"""What the page asks and what it gets back: query strings in, the CLI's own result objects out.

A request names its settings as the CLI does, by flag name without the dashes (`?model=llama-3-8b&seq-len=4096
&gpu=rtx-4090`), so a URL reads like a command line. Values go through the CLI's own parsing (options.FLAGS,
options.grid_from_args, TrainSpec's checks), so a bad value gets the CLI's one-line message. The answer holds
`estimate(...).to_dict()` (what `memplan estimate --json` prints), the per-GPU verdicts (`gpu_verdicts`, what the
table and `memplan gpus` print) and `plan.fit(...).to_dict()` (what `memplan fit --json` prints). The page formats
those numbers and computes none.

Models: a catalog name or alias, or the label of a config.json given to `memplan serve --config PATH` on the
command line. A request never names a path: the server reads no file a request asks for.
"""
from __future__ import annotations

import argparse
import shlex
from functools import lru_cache

from memplan import __version__
from memplan.errors import MemplanError
from memplan.options import FLAGS
from memplan.report import provenance
from memplan.report.figures import components_by_phase
from memplan.report.verdicts import gpu_verdicts
from memplan.spec import CHOICES, TRAIN_FIELDS, TrainSpec

DEFAULT_MODEL = "llama-3.1-8b"
DEFAULT_GPU = "rtx-4090"
# Query keys that are not training flags: the model, the GPU that `fit` plans against, fit's safety margin.
PAGE_KEYS = ("model", "gpu", "margin")
# Training flags are TrainSpec fields; an options-level flag that names a file (--from, --dataset) never reaches
# the page: the server reads no path a request names.
FLAG_KEYS = {flag.lstrip("-"): field_name for flag, field_name, _, _ in FLAGS if field_name in TRAIN_FIELDS}
MAX_VALUE = 200  # characters per query value: a model name or a '+'-list of module names is far shorter


def _shown(value) -> str:
    """A TrainSpec default as the CLI's --help shows it (options.add_train_flags)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return "+".join(value) or "none"
    return str(value)


def _choices(field_name: str, default) -> list[str] | None:
    """The values TrainSpec accepts for a choice field (spec.CHOICES); None for free values."""
    if isinstance(default, bool):
        return ["on", "off"]
    return [str(c) for c in CHOICES[field_name]] if field_name in CHOICES else None


@lru_cache(maxsize=1)
def form_fields() -> list[dict]:
    """One entry per training flag of options.FLAGS, in order: what the page's form draws."""
    defaults = TrainSpec()
    out = []
    for flag, field_name, _, text in FLAGS:
        if field_name not in TRAIN_FIELDS:
            continue
        default = getattr(defaults, field_name)
        choices = _choices(field_name, default)
        kind = "select" if choices else "number" if isinstance(default, (int, float)) else "text"
        out.append({"key": flag.lstrip("-"), "flag": flag, "field": field_name, "help": text,
                    "default": _shown(default), "kind": kind, "choices": choices})
    return out


class Models:
    """The models a request may name: the catalog, plus the configs given on the command line (by label)."""

    def __init__(self, config_paths: list[str] = (), trust_remote_code: bool = False):
        from memplan.catalog import resolve_model

        self.local: dict[str, object] = {}
        self.paths: dict[str, str] = {}  # label -> the path given on the command line (for the equivalent command)
        for path in config_paths:
            try:
                spec = resolve_model(path, trust_remote_code=trust_remote_code)  # read once, at start-up
            except MemplanError as e:
                raise MemplanError(f"--config {path}: {e}") from None
            label = spec.name
            if label in self.local or self._catalog_key(label):
                label = f"{label} ({path})"
            self.local[label] = spec
            self.paths[label] = path

    @staticmethod
    def _catalog_key(ref: str):
        from memplan.catalog import _key, _model_aliases

        return _model_aliases().get(_key(ref))

    def names(self) -> list[dict]:
        from memplan.catalog import models

        out = [{"name": label, "local": True, "params": spec.total_params} for label, spec in self.local.items()]
        for entry in models().values():
            out.append({"name": entry["name"], "local": False, "hf_id": entry.get("hf_id") or "",
                        "aliases": entry.get("aliases", [])})
        return out

    def resolve(self, ref: str):
        from memplan.catalog import _suggest, resolve_model

        ref = ref.strip()
        if not ref:
            raise MemplanError("model: give a catalog name (see `memplan models`)")
        if ref in self.local:
            return self.local[ref]
        if self._catalog_key(ref) is None:
            hint = _suggest(ref)
            raise MemplanError(f"unknown model {ref!r}{hint}" + ("" if "did you mean" in hint else
                               " (this server reads only catalog models and the configs given to "
                               "`memplan serve --config`)"))
        return resolve_model(ref)


def parse(params) -> tuple[str, str, str | None, TrainSpec]:
    """(model, gpu, margin, spec) from a query mapping, with the CLI's parsing and messages."""
    for key, value in params.items():
        if key not in FLAG_KEYS and key not in PAGE_KEYS:
            raise MemplanError(f"unknown parameter {key!r}; the settings are model, gpu, margin and the training "
                               "flags without their dashes (seq-len, bits, ...)")
        if len(value) > MAX_VALUE:
            raise MemplanError(f"{key}: value longer than {MAX_VALUE} characters")
    if hasattr(params, "getlist"):
        repeated = [k for k in params if len(params.getlist(k)) > 1]
        if repeated:
            raise MemplanError(f"{repeated[0]} given more than once; comma-separated values make a grid, which "
                               "`memplan sweep` and `memplan report --html` take")
    ns = argparse.Namespace(**{f: params[k] if k in params else None for k, f in FLAG_KEYS.items()})
    from memplan.options import grid_from_args

    specs = grid_from_args(ns)
    if len(specs) != 1:
        raise MemplanError(f"one value per setting ({len(specs)} configurations given); comma-separated values "
                           "make a grid, which `memplan sweep` and `memplan report --html` take")
    gpu = params.get("gpu", DEFAULT_GPU).strip()
    margin = params.get("margin", "").strip() or None
    return params.get("model", DEFAULT_MODEL), gpu, margin, specs[0]


def command_line(model: str, gpu: str, params) -> str:
    """The `memplan estimate` command that prints the same figures."""
    parts = ["memplan", "estimate", model]
    for key in FLAG_KEYS:
        if key in params and params[key].strip():
            parts += [f"--{key}", params[key].strip()]
    if gpu:
        parts += ["--gpu", gpu]
    return " ".join(shlex.quote(p) for p in parts)


def plan_view(params, models: Models) -> dict:
    """Everything the page shows for one configuration (raises MemplanError for bad input)."""
    from memplan.calibrate import overheads_for
    from memplan.catalog import resolve_gpu
    from memplan.commands.estimate import _which, describe
    from memplan.estimate import SOURCES, estimate

    model_ref, gpu_name, margin, spec = parse(params)
    model = models.resolve(model_ref)
    gpu = resolve_gpu(gpu_name) if gpu_name else None
    # what `memplan estimate MODEL [flags] --gpu GPU --json` does (commands/estimate.py)
    overheads, cal_notes = overheads_for(gpu.name if gpu else None)
    est = estimate(model, spec, overheads)
    est.notes.extend(n for n in cal_notes if n.startswith("ignoring"))
    est_dict = est.to_dict()
    verdicts = gpu_verdicts(model, spec, est, overheads)
    view = {
        "memplan_version": __version__,
        "model": model.name,
        "model_source": model.source,
        "command": command_line(models.paths.get(model_ref.strip(), model_ref.strip()), gpu.name if gpu else "",
                                params),
        "describe": describe(est.config),
        "estimate": est_dict,
        "sources": SOURCES,
        "overheads_used": _which(overheads, cal_notes),
        "stack": provenance.stack(est_dict),
        "gpus": verdicts,
        "figure": components_by_phase(est_dict),
        "fit": None,
    }
    if gpu:
        from memplan.plan import fit, make_budget

        # what `memplan fit MODEL --gpu GPU [--margin M] --json` does (commands/fit.py)
        budget = make_budget(gpu.name, None, margin)
        try:
            view["fit"] = fit(model, spec, budget, overheads).to_dict()
            view["fit_command"] = view["command"].replace("memplan estimate", "memplan fit", 1) + (
                f" --margin {shlex.quote(margin)}" if margin else "")
        except MemplanError as e:  # nothing makes it fit this GPU: fit's own one-line answer
            view["fit"] = {"error": str(e), "budget": budget.to_dict()}
    return view
