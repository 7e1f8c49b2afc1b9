"""Test-wide settings: derived architectures (memplan/derive) are cached in a temporary folder, never in the user's
~/.cache (subprocesses the tests start inherit it)."""
from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("MEMPLAN_DERIVED_CACHE", tempfile.mkdtemp(prefix="memplan-test-derived-"))


@pytest.fixture
def no_calibration(tmp_path, monkeypatch):
    """Uncalibrated overheads: an empty calibration folder, so results do not depend on the user's calibrations."""
    from memplan import calibrate

    monkeypatch.setenv(calibrate.ENV_DIR, str(tmp_path / "calibrations"))
    calibrate.select.cache_clear()
    yield
    calibrate.select.cache_clear()
