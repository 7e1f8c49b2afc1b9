"""Test-wide settings: derived architectures (memplan/derive) are cached in a temporary folder, never in the user's
~/.cache (subprocesses the tests start inherit it)."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("MEMPLAN_DERIVED_CACHE", tempfile.mkdtemp(prefix="memplan-test-derived-"))
