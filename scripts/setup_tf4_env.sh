#!/usr/bin/env bash
# A second Python environment with the last transformers 4.x release, for `memplan trace` / `profile` under the
# transformers-4 stack (MoE experts as nn.Linear, quantized by bitsandbytes) and for tests/test_stack.py.
#
# It is a venv over the global interpreter (--system-site-packages): torch, bitsandbytes, accelerate and
# everything else come from the global environment (torch 2.13.0 from this disk, no download); only
# transformers 4.57.6 and the packages its pins need (huggingface_hub < 1.0, tokenizers < 0.23) are installed
# into the venv, where they shadow the global 5.x ones. PEFT: the global one if it imports under 4.57, else the
# last PEFT release that supported transformers 4 (MEMPLAN_TF4_PEFT, default 0.17.1).
#
#   scripts/setup_tf4_env.sh [VENV]      default: $MEMPLAN_TF4_VENV or ~/.cache/memplan/venv-tf4
#   PYTHONPATH=$PWD VENV/bin/python -m memplan trace mixtral-8x7b --transformers 4
set -euo pipefail
VENV="${1:-${MEMPLAN_TF4_VENV:-$HOME/.cache/memplan/venv-tf4}}"
PY="${PYTHON:-python3}"
TF4="${MEMPLAN_TF4_TRANSFORMERS:-4.57.6}"
PEFT4="${MEMPLAN_TF4_PEFT:-0.17.1}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "transformers==$TF4" "huggingface_hub<1.0" \
  "tokenizers>=0.22,<0.23"
if ! "$VENV/bin/python" -c "import peft, peft.tuners.lora.bnb" >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "peft==$PEFT4"
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers, peft, bitsandbytes  # noqa: F401  (each must import)
print("tf4 env:", ", ".join(f"{p} {md.version(p)}" for p in ("transformers", "peft", "bitsandbytes", "torch")))
PY
echo "$VENV"
