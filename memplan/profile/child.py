"""The child process of one profile run: `python -m memplan.profile.child JOB.json`.

Each configuration runs in its own process so that an out-of-memory error, a CUDA fault or a leaked allocation
cannot poison the next one. The job file is written by memplan.profile.grid; the child writes the profile to
job["output"] atomically (runner.run_job) and prints progress lines starting with '@memplan '.
Exit status: 0 for ok/oom, 3 for error, 130 for interrupted, 4 when the parent is gone (nothing written); a rank
of a multi-GPU run exits 5 for oom, so that its launcher stops the ranks waiting for it in a collective.

With --gpus N (a strategy other than none) the child is the launcher of N rank processes (memplan.profile.multi:
`accelerate launch -m memplan.profile.rank JOB.json`), each of which runs this same run_file() on its rank's job.

The child dies with its parent: on Linux it asks the kernel for SIGKILL when the parent exits
(prctl PR_SET_PDEATHSIG), then checks that the parent named in the job (job["parent_pid"]) is still its parent
(it may have died before the prctl); runner.run_job checks again before writing. A grid killed outright therefore
leaves no orphan that would write a profile (or a half-written one) behind the resumed grid's back.
"""
from __future__ import annotations

import json
import os
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    return run_file(sys.argv[1:] if argv is None else argv)


def run_file(argv: list[str], fill=None) -> int:
    """Run the job in argv[0]; fill(job) completes it first (a rank: its RANK from accelerate launch)."""
    if len(argv) != 1:
        print("usage: python -m memplan.profile.child JOB.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    if fill is not None:
        job = fill(job)
    die_with_parent()
    if orphaned(job):
        print("memplan: the parent grid is gone; not running", file=sys.stderr)
        return 4
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from a profile
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if job.get("threads"):
        import torch

        torch.set_num_threads(int(job["threads"]))
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    from memplan.profile.runner import run_job

    if job.get("dist") is None and _multi(job):  # --gpus N: this process launches the N ranks
        from memplan.profile.multi import launch

        profile = launch(job)
    else:
        profile = run_job(job)
    if job.get("dist") is not None:  # a rank: any end but ok makes torchrun's agent stop the others
        return {"ok": 0, "oom": 5, "interrupted": 130}.get(profile["status"], 3)
    return {"ok": 0, "oom": 0, "interrupted": 130}.get(profile["status"], 3)


def _multi(job: dict) -> bool:
    from memplan.profile.runner import _train_spec

    return _train_spec(job["train"]).strategy != "none"


def die_with_parent() -> bool:
    """SIGKILL this process when its parent exits (Linux prctl PR_SET_PDEATHSIG); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def orphaned(job: dict) -> bool:
    """True if the grid process that started this child is no longer its parent; for a rank (whose parent is
    accelerate launch's torchrun agent), if the memplan launcher that started accelerate launch is gone."""
    parent = job.get("parent_pid")
    if parent is not None and os.getppid() != int(parent):
        return True
    launcher = job.get("launcher_pid")
    if launcher is not None:
        try:
            os.kill(int(launcher), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


if __name__ == "__main__":
    sys.exit(main())
