"""Every option of every command that writes a file: a directory, a missing folder, an unwritable place (/proc)
gives one error line and exit 2, before any work (memplan/outputs.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memplan.cli import main

TINY = ["--seq-len", "64"]
# (command line up to the option, option, extra args after it). Each one fails on its output path before it
# would import torch or run anything.
CASES = [
    (["estimate", "llama-2-7b"], "--csv", []),
    (["trace", "llama-3.2-1b", *TINY], "--timeline", []),
    (["trace", "llama-3.2-1b", *TINY], "--plot", []),
    (["sweep", "llama-2-7b", "--out", "{ok}"], "--plot", []),
    (["sweep", "llama-2-7b"], "--out", []),
    (["validate", "--models", "llama-3.2-1b"], "--csv", []),
    (["validate", "--against", "profiles", "--csv", "{ok}"], "--figure", []),
    (["profile", "llama-3.2-1b", "--device", "cpu", *TINY], "--csv", []),
    (["calibrate"], "--out", []),
    (["report", "llama-2-7b"], "--html", []),
]


def _bad_paths(tmp_path):
    missing = tmp_path / "no" / "such" / "out.csv"
    return {"directory": str(tmp_path), "missing folder": str(missing), "unwritable": "/proc/x.csv"}


@pytest.mark.parametrize("argv, option, extra", CASES, ids=[f"{c[0][0]} {c[1]}" for c in CASES])
def test_a_bad_output_path_is_one_line_and_exit_2(tmp_path, capsys, argv, option, extra):
    for kind, bad in _bad_paths(tmp_path).items():
        if option == "--out" and argv[0] == "calibrate" and kind == "directory":
            continue  # calibrate --out takes a folder
        if kind == "missing folder" and option == "--out" and argv[0] == "calibrate":
            bad = bad.replace(".csv", ".json")
        args = [a.replace("{ok}", str(tmp_path / "ok.csv")) for a in argv] + [option, bad, *extra]
        capsys.readouterr()
        assert main(args) == 2, (kind, args)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and option in err[0], (kind, err)
        assert "Traceback" not in err[0]


def test_calibrate_out_as_a_file_where_a_folder_is_meant(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.write_text("")
    capsys.readouterr()
    assert main(["calibrate", "--out", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is not a folder" in err


@pytest.mark.parametrize("path", ["/", "/proc/x.csv"])
def test_estimate_csv_from_the_issue(path):
    """The issue's own examples, as a user runs them."""
    r = subprocess.run([sys.executable, "-m", "memplan", "estimate", "llama-2-7b", "--csv", path],
                       capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("memplan estimate: error: --csv")
