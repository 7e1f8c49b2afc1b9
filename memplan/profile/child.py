"""The child process of one profile run: `python -m memplan.profile.child JOB.json`.

Each configuration runs in its own process so that an out-of-memory error, a CUDA fault or a leaked allocation
cannot poison the next one. The job file is written by memplan.profile.grid; the child writes the profile to
job["output"] atomically (runner.run_job) and prints progress lines starting with '@memplan '.
Exit status: 0 for ok/oom, 3 for error, 130 for interrupted.
"""
from __future__ import annotations

import json
import os
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m memplan.profile.child JOB.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
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

    profile = run_job(job)
    return {"ok": 0, "oom": 0, "interrupted": 130}.get(profile["status"], 3)


if __name__ == "__main__":
    sys.exit(main())
