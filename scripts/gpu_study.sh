#!/usr/bin/env bash
# The Fashion-MNIST study on one GPU, within a 15-minute window (issue 10).
#
#   OUT=/path/to/results scripts/gpu_study.sh            # on the GPU machine (results under $OUT/study)
#   DRY_RUN=1 OUT=/tmp/plan scripts/gpu_study.sh          # anywhere: check and print the plan, train nothing
#
# What it does: (1) the CUDA-only engine tests (data on the device), (2) `batchmates study` of
# docs/study/fashion-mnist-gpu.yaml (resnet18, 15 epochs supervised / 10 self-supervised / 8 ViT, 5 seeds, bf16) with
# JOBS runs side by side on the GPU (each its own process; the training data lives on the device), stopped
# STUDY_SECONDS after it starts, (3) the report of whatever finished (results.md, results.json, plots) -- the study
# resumes where it stopped when the script is run again with the same OUT. Runs go seed by seed, so a window that
# ends early still covers every variant. Fashion-MNIST must be readable on the machine: set DATA_DIR to a copy of
# its four .gz files (default: data/fashion-mnist in this checkout, if present).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the results directory}
JOBS=${JOBS:-4}
THREADS=${THREADS:-3}
STUDY_SECONDS=${STUDY_SECONDS:-660}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DATA_ARGS=()
if [[ -n "${DATA_DIR:-}" ]]; then DATA_ARGS=(--data-dir "$DATA_DIR");
elif [[ -d data/fashion-mnist ]]; then DATA_ARGS=(--data-dir data/fashion-mnist); fi
STUDY=(-m batchmates study docs/study/fashion-mnist-gpu.yaml --out "$OUT/study" --threads "$THREADS"
       --no-progress "${DATA_ARGS[@]}")
mkdir -p "$OUT"

if [[ -n "${DRY_RUN:-}" ]]; then
  "$PY" "${STUDY[@]}" --accelerator cpu --dry-run
  exit 0
fi

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  | tee "$OUT/device.txt"
"$PY" -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
start=$(date +%s)
timeout --signal=INT --kill-after=30 "$STUDY_SECONDS" \
  "$PY" "${STUDY[@]}" --accelerator gpu --jobs "$JOBS" 2>&1 | tee "$OUT/study.log" || true
echo "study ran $(( $(date +%s) - start )) s" | tee -a "$OUT/study.log"
"$PY" "${STUDY[@]}" --accelerator gpu --report 2>&1 | tail -20 | tee -a "$OUT/study.log"
