#!/usr/bin/env bash
# Refresh the README's screenshots (reports/serve.png, reports/report.png) from the browser tests: memplan serve
# and memplan report --html, rendered by the system Chromium (tests/test_web_browser.py).
set -euo pipefail
cd "$(dirname "$0")/.."
MEMPLAN_SCREENSHOT_DIR="$PWD/reports" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  python -m pytest -q -p no:cacheprovider tests/test_web_browser.py -k "does_not_fit or opens_offline"
rm -f reports/serve_changed.png
