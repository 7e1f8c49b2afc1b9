"""The library stack a result describes: transformers / PEFT / bitsandbytes / torch versions.

Memory depends on the stack (MoE experts are nn.Linear modules under transformers 4 and fused 3-D parameters
under 5, DESIGN.md), so every estimate, trace and profile names the versions it describes.

- The default is what is installed, read from package metadata (no torch import; _version).
- A package that is not installed counts as the latest release memplan supports (LATEST), and says so.
- `--transformers 4|5` (TrainSpec.transformers) overrides the transformers major the estimate models; the
  release it then describes is the last one of that major (RELEASES). The trace and profile run the installed
  code and refuse an override that differs from it (check_runs_installed).
"""
from __future__ import annotations

import os
import sys
from functools import lru_cache

from memplan.errors import MemplanError

PACKAGES = ("transformers", "peft", "bitsandbytes", "torch")
# The latest supported release of each package: what a result describes when a package is not installed.
LATEST = {"transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.50.2", "torch": "2.13.0"}
# The transformers release modelled for each supported major when --transformers overrides the installed one.
RELEASES = {4: "4.57.6", 5: LATEST["transformers"]}
MAJORS = tuple(RELEASES)


@lru_cache(maxsize=None)
def installed() -> dict[str, str | None]:
    """{package: installed version or None}, from package metadata."""
    return {name: _version(name) for name in PACKAGES}


def _version(name: str) -> str | None:
    """importlib.metadata.version(name), without importing importlib.metadata and its e-mail parser (about 50 ms
    of every command's start-up): the first NAME-VERSION.dist-info directory along sys.path, as its path finder
    searches, and the Version field of its METADATA. Anything else (an egg-info, a zipped path) asks
    importlib.metadata."""
    prefix = name.lower() + "-"
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as found:
                infos = [d.path for d in found if d.name.lower().startswith(prefix) and d.name.endswith(".dist-info")]
        except OSError:
            continue
        for path in infos:
            try:
                with open(os.path.join(path, "METADATA"), encoding="utf-8") as f:
                    for line in f:
                        if line.startswith("Version:"):
                            return line.split(":", 1)[1].strip()
                        if not line.strip():  # the headers end here
                            break
            except OSError:
                pass
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major(version: str) -> int:
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return MAJORS[-1]
    return min(max(major, MAJORS[0]), MAJORS[-1])  # 3.x behaves as 4 here, 6.x as 5 (noted by stack())


@lru_cache(maxsize=None)
def installed_major() -> int:
    """The transformers major that is installed (the latest supported when none is)."""
    return _major(installed()["transformers"] or LATEST["transformers"])


@lru_cache(maxsize=None)
def stack(transformers_major: int = 0) -> dict:
    """The versions a result for `transformers_major` (0: the installed one) describes, and where each came from.

    Returns {"transformers": "5.24.0", "peft": ..., "bitsandbytes": ..., "torch": ..., "source": {...}}; cached:
    treat it as read-only (to_dict() copies it)."""
    have = installed()
    out: dict = {}
    source: dict = {}
    for name in PACKAGES:
        if have[name]:
            out[name], source[name] = have[name], "installed"
        else:
            out[name], source[name] = LATEST[name], "not installed: latest supported"
    if transformers_major and transformers_major != _major(out["transformers"]):
        out["transformers"] = RELEASES[transformers_major]
        source["transformers"] = f"--transformers {transformers_major}: its last release"
    out["source"] = source
    return out


def describe(st: dict) -> str:
    """One line: 'transformers 5.24.0 · peft 0.21.2 · bitsandbytes 0.50.2 · torch 2.13.0 (installed)'."""
    parts = " · ".join(f"{name} {st[name]}" for name in PACKAGES)
    sources = st.get("source", {})
    odd = [f"{name}: {why}" for name, why in sources.items() if why != "installed"]
    return f"{parts} ({'; '.join(odd) if odd else 'installed'})"


def check_major(value) -> int:
    """Validate a TrainSpec.transformers value; 0 means the installed major."""
    if value == 0 or value is None:
        return installed_major()
    if isinstance(value, bool) or value not in MAJORS:
        raise MemplanError(f"unsupported transformers {value!r} (the major version whose behaviour the result "
                           f"describes); choose one of: {', '.join(map(str, MAJORS))}")
    return value


def check_runs_installed(major: int, what: str) -> None:
    """The trace and profile run the installed transformers: refuse a --transformers that differs from it."""
    if major != installed_major():
        have = installed()["transformers"] or "none"
        raise MemplanError(
            f"--transformers {major}: {what} runs the installed transformers ({have}); run it in a transformers-"
            f"{major} environment (scripts/setup_tf4_env.sh sets one up for 4.x), or drop --transformers")
