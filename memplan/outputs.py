"""Output paths: every option that writes a file checks its path here first, so that a directory, a missing or
unwritable folder, or a special file gives one clear line (MemplanError, exit 2) instead of a traceback after
minutes of work."""
from __future__ import annotations

import os
from pathlib import Path

from memplan.errors import MemplanError


def output_path(path: str | os.PathLike, option: str, *, make_parents: bool = False) -> Path:
    """`path` as a Path, once it is known that a regular file can be written there.

    option names the flag in the error (`--csv`). make_parents creates a missing parent folder (for defaults such
    as reports/...); a user-given path whose folder does not exist is an error, as in most CLI tools.
    """
    p = Path(path)
    if str(path) == "" or p.is_dir() or str(path).endswith(os.sep):
        raise MemplanError(f"{option} {str(path)!r} is a directory; give a file path")
    if p.exists() and not p.is_file():
        raise MemplanError(f"{option} {str(path)!r} is not a regular file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        if not make_parents:
            raise MemplanError(f"{option} {str(path)!r}: folder {str(parent)!r} does not exist")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MemplanError(f"{option} {str(path)!r}: cannot create folder {str(parent)!r} ({e.strerror})") from None
    if not parent.is_dir():
        raise MemplanError(f"{option} {str(path)!r}: {str(parent)!r} is not a folder")
    target = p if p.exists() else parent
    if not os.access(target, os.W_OK) or _read_only_fs(parent):
        raise MemplanError(f"{option} {str(path)!r}: not writable")
    return p


def _read_only_fs(folder: Path) -> bool:
    """/proc, /sys and read-only mounts pass os.access as root; statvfs says the truth."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY) or str(folder.resolve()).startswith(("/proc", "/sys"))
    except OSError:
        return True


def output_dir(path: str | os.PathLike, option: str) -> Path:
    """`path` as a folder memplan may write files into, created if missing (with its parents), or one error line:
    a regular file there, a folder that cannot be created, or one that is not writable."""
    p = Path(path)
    if str(path) == "":
        raise MemplanError(f"{option} needs a folder")
    if p.exists() and not p.is_dir():
        raise MemplanError(f"{option} {str(path)!r} is not a folder")
    if not p.exists():
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MemplanError(f"{option} {str(path)!r}: cannot create folder ({e.strerror})") from None
    if not os.access(p, os.W_OK) or _read_only_fs(p):
        raise MemplanError(f"{option} {str(path)!r}: not writable")
    return p
