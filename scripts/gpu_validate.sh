#!/usr/bin/env bash
# GPU validation: real QLoRA profiles on one GPU, sized to finish in <= 10 minutes on one H200.
#
#   scripts/gpu_validate.sh OUTDIR
#
# Profiles Llama-2-7B, Llama-3-8B, Mistral-7B, Llama-2-13B, Qwen2.5-14B and one Llama-2-70B configuration,
# seq 512/2048/4096, checkpointing on/off, LoRA r 16/64, most valuable first (scripts/gpu_grid.py has the order),
# built from the catalog configs (no downloads: random weights created and quantized on the GPU layer by layer,
# `memplan profile --load direct`). It stops starting configurations when the next would not finish in the budget,
# and keeps OUTDIR complete after every configuration:
#   OUTDIR/gpu_validate.log   everything printed
#   OUTDIR/env.json           `memplan env --json` (GPU, driver, versions)
#   OUTDIR/profiles.tar.gz    the memplan.profile/1 JSON files (unpack into profiles/)
#   OUTDIR/profiles.csv       one row per run (docs/profile.md)
#   OUTDIR/summary.json       one line per configuration: status, peaks, estimate error
#   OUTDIR/multi_gpu/         `memplan profile --gpus N` of a small catalog model through `accelerate launch` (one
#                             process per GPU, NCCL, the config file in each profile's run.launch): with more than one
#                             GPU visible (nvidia-smi -L) 2 ranks under FSDP2 and DDP, with one GPU N = 1 FSDP2; its
#                             profiles/ (every rank's per-phase peaks), profiles.csv and multi_gpu.log;
#                             OUTDIR/multi_gpu_profiles.tar.gz bundles them.
#   OUTDIR/callback/          MemplanCallback in a real Trainer run (scripts/gpu_callback.py): its CUDA branch's
#                             per-phase allocated / reserved peaks beside the estimate, its profile, summary.json
#
# Environment:
#   DEVICE=cuda|cpu   cpu = dry run of the same logic with tiny stand-in models (a few minutes on a laptop CPU)
#   BUDGET_S=480      seconds for the grid itself (setup and bundling come on top)
#   TIMEOUT_S=240     seconds per configuration at most
#   WHEELS=.whl       folder with the bitsandbytes wheel (the device has no bitsandbytes and no internet)
#   PYTHON=python3    the interpreter that has torch
#   LIMIT=N           only the first N configurations of the plan
#   TRACE=1           also run the meta trace in each child (CPU seconds per configuration)
#   MULTI_MODEL=llama-3.2-1b   the multi-GPU section's model; MULTI_PARALLEL="fsdp ddp" its strategies ("fsdp" on
#                     one GPU; zero2 / zero3 run DeepSpeed's engine through accelerate's DeepSpeed plugin if deepspeed is
#                     installed); MULTI_BUDGET_S=240 its share of BUDGET_S
#   CALLBACK_S=120    the Trainer callback run's share of BUDGET_S (0: skip it)
#   ALLOC_CHECK=1     first, the caching-allocator check (scripts/gpu_allocator.py, ALLOC_BUDGET_S=240 of the
#                     budget): real profiles with and without expandable_segments, each recording the allocator's
#                     own trace (torch.cuda.memory._record_memory_history) into OUTDIR/snapshots.tar.gz, and
#                     measured vs predicted max_memory_reserved in OUTDIR/allocator_check.json
#
# The bitsandbytes wheel, fetched once on a machine with internet, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whl bitsandbytes==0.50.2
# (43 MB; carry `.whl` with the run.) peft, transformers, accelerate, safetensors, rich and nvidia-ml-py are
# in the device image; anything missing is reported by the import check below.
set -uo pipefail

OUTDIR=${1:?usage: scripts/gpu_validate.sh OUTDIR}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-480}
TIMEOUT_S=${TIMEOUT_S:-240}
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG="$OUTDIR/gpu_validate.log"
exec > >(tee -a "$LOG") 2>&1
echo "gpu_validate: $(date -u +%FT%TZ) device=$DEVICE budget=${BUDGET_S}s"

cd "$HERE"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

# bitsandbytes from the carried wheel (only if the interpreter lacks it)
if ! "$PYTHON" -c "import bitsandbytes" 2>/dev/null; then
  whl=$(ls "$WHEELS"/bitsandbytes-*.whl 2>/dev/null | head -1)
  if [ -z "$whl" ]; then
    echo "gpu_validate: bitsandbytes is not installed and no wheel in $WHEELS/ (see this script's header)"; exit 3
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/memplan-site "$whl" \
    || { echo "gpu_validate: installing $whl failed"; exit 3; }
  export PYTHONPATH="$PYTHONPATH:/tmp/memplan-site"
fi
"$PYTHON" - <<'PY' || exit 3
import importlib
missing = []
for m in ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "rich", "pynvml"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m} {getattr(mod, '__version__', '')}")
    except Exception as e:
        missing.append(f"{m} ({e.__class__.__name__}: {e})")
if missing:
    raise SystemExit("gpu_validate: missing: " + ", ".join(missing))
PY
"$PYTHON" -m memplan env --json > "$OUTDIR/env.json" 2>>"$LOG"; "$PYTHON" -m memplan env
if [ "$DEVICE" = cuda ]; then
  "$PYTHON" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_validate: torch sees no CUDA device"; exit 4; }
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
fi

# the caching-allocator check (issue #12) takes its share of the budget first
if [ "${ALLOC_CHECK:-0}" = 1 ]; then
  "$PYTHON" scripts/gpu_allocator.py "$OUTDIR" --device "$DEVICE" --budget "${ALLOC_BUDGET_S:-240}" \
    || echo "gpu_validate: allocator check exit status $?"
fi

# the multi-GPU section (issue #13): 2 ranks when more than one GPU is visible, N = 1 FSDP2 on one GPU (both through
# accelerate launch); DEVICE=cpu dry-runs it on gloo
NGPU=0
[ "$DEVICE" = cuda ] && NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
MULTI=0
MULTI_BUDGET_S=${MULTI_BUDGET_S:-240}
RANKS=2
if [ "$DEVICE" = cpu ] || [ "$NGPU" -gt 1 ]; then MULTI=1; fi
if [ "$DEVICE" = cuda ] && [ "$NGPU" = 1 ]; then MULTI=1; RANKS=1; MULTI_PARALLEL=${MULTI_PARALLEL:-fsdp}; fi

# the grid gets what is left of the budget after setup (and the multi-GPU section's share)
SETUP=$(( $(date +%s) - START ))
GRID_S=$(( BUDGET_S - SETUP ))
[ "$MULTI" = 1 ] && [ "$DEVICE" = cuda ] && GRID_S=$(( GRID_S - MULTI_BUDGET_S ))
[ "$DEVICE" = cuda ] && GRID_S=$(( GRID_S - ${CALLBACK_S:-120} ))
echo "gpu_validate: setup took ${SETUP}s; grid budget ${GRID_S}s"
args=("$OUTDIR" --device "$DEVICE" --budget "$GRID_S" --timeout "$TIMEOUT_S")
[ -n "${LIMIT:-}" ] && args+=(--limit "$LIMIT")
[ "${TRACE:-0}" = 1 ] && args+=(--trace)
"$PYTHON" scripts/gpu_grid.py "${args[@]}"
rc=$?
echo "gpu_validate: grid exit status $rc after $(( $(date +%s) - START ))s"

# multi-GPU: two ranks (one process per GPU, NCCL; gloo in the CPU dry run), FSDP2 then DDP, every rank's
# per-phase peaks in one profile each. Nothing is written here unless a run produced it.
if [ "$MULTI" = 1 ]; then
  MDIR="$OUTDIR/multi_gpu"
  mkdir -p "$MDIR"
  if [ "$DEVICE" = cuda ]; then
    MODEL=${MULTI_MODEL:-llama-3.2-1b}
    margs=(--load direct --seq-len 2048 --timeout "$(( MULTI_BUDGET_S / 2 ))")
  else  # a tiny stand-in (as scripts/gpu_grid.py's dry run), the trace's kernel models: comparable byte for byte
    MODEL="$MDIR/tiny-llama.json"
    echo '{"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024,
 "tie_word_embeddings": false}' > "$MODEL"
    margs=(--seq-len 128 --kernels gpu --threads 1)
  fi
  [ "${TRACE:-0}" = 1 ] || [ "$DEVICE" = cpu ] || margs+=(--no-trace)
  echo "gpu_validate: multi-GPU section: $NGPU GPU(s) visible; $MODEL on $RANKS rank(s): ${MULTI_PARALLEL:-fsdp ddp}"
  for par in ${MULTI_PARALLEL:-fsdp ddp}; do
    "$PYTHON" -m memplan profile "$MODEL" --device "$DEVICE" --gpus "$RANKS" --parallel "$par" --steps 3 \
      --profiles "$MDIR/profiles" --csv "$MDIR/profiles.csv" --no-progress "${margs[@]}" 2>&1 \
      | tee -a "$MDIR/multi_gpu.log"
    echo "gpu_validate: multi-GPU $par exit status ${PIPESTATUS[0]}"
  done
  if ls "$MDIR"/profiles/*.json >/dev/null 2>&1; then
    tar czf "$OUTDIR/multi_gpu_profiles.tar.gz" -C "$MDIR" profiles
  fi
else
  echo "gpu_validate: multi-GPU section skipped: no GPU visible"
fi
# the Trainer callback (issue #14) on the device: its CUDA branch has only run against stand-in counters on the CPU
if [ "${CALLBACK_S:-120}" -gt 0 ]; then
  timeout "${CALLBACK_S:-120}" "$PYTHON" scripts/gpu_callback.py "$OUTDIR" --device "$DEVICE" 2>&1 | tail -20
  echo "gpu_validate: callback exit status ${PIPESTATUS[0]}"
fi
ls -la "$OUTDIR"
exit $rc
