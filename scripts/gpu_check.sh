#!/usr/bin/env bash
# The GPU check in one go, for the first time a CUDA machine is at hand (minutes on one GPU):
#   1. the tests that need CUDA (pytest -k cuda: the benchmark's timing, peak memory and AMP on the device);
#   2. a few AMP training steps (fp16 with loss scaling, then bf16, then bf16 with --compile) under torchrun with
#      one process, on FAKE data (16 steps of 64 images at 224 px and an evaluation);
#   3. the benchmark of RAVLT-T/S beside the authors' implementation (when AUTHORS_FILE is given) and
#      convnext_tiny: eval and training steps in fp32, fp16 and bf16 (channels-last, with peak memory and the
#      matrix-product rate), then eager against torch.compile in bf16.
# Results (JSON tables, the training folders) go to OUTPUT_DIR (default output/gpu_check); BATCH (default 128)
# is the benchmark's batch.
#
#   bash scripts/gpu_check.sh [OUTPUT_DIR]
#   AUTHORS_FILE=path/to/RALA.py AUTHORS_PATH_EXTRA=path/to/einops_folder bash scripts/gpu_check.sh
#   DRY_RUN=1 bash scripts/gpu_check.sh     # print the commands, run nothing
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUT="${1:-output/gpu_check}"
BATCH="${BATCH:-128}"

step() {
    echo "+ $*"
    if [ -z "${DRY_RUN:-}" ]; then
        "$@"
    fi
}

if [ -z "${DRY_RUN:-}" ]; then
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device is visible; this script checks the GPU paths')"
    mkdir -p "$OUT"
fi

MODELS=(RAVLT_T RAVLT_S)
AUTHORS=()
if [ -n "${AUTHORS_FILE:-}" ]; then
    MODELS=(RAVLT_T authors:RAVLT_T RAVLT_S authors:RAVLT_S)
    # shellcheck disable=SC2206  # a space-separated list of folders
    AUTHORS=(--authors-file "$AUTHORS_FILE" --authors-path-extra ${AUTHORS_PATH_EXTRA:-})
fi

step python -m pytest -q -k cuda tests/

for run in fp16 bf16 bf16_compile; do
    extra=()
    if [ "$run" = bf16_compile ]; then
        extra=(--compile)
    fi
    step torchrun --nproc_per_node=1 main.py --model RAVLT_T --data-set FAKE --input-size 224 --batch-size 64 \
        --epochs 1 --warmup-epochs 0 --amp "${run%_compile}" --device cuda --num_workers 4 --print-freq 4 \
        --output_dir "$OUT/train_$run" "${extra[@]}"
done

for amp in none fp16 bf16; do
    step python scripts/benchmark.py --device cuda --model "${MODELS[@]}" convnext_tiny --mode eval train \
        --batch-size "$BATCH" --amp "$amp" --channels-last --memory --matmul-rate --json "$OUT/benchmark_$amp.json" \
        "${AUTHORS[@]}"
done
step python scripts/benchmark.py --device cuda --model RAVLT_T RAVLT_S --backend eager compile --mode eval train \
    --batch-size "$BATCH" --amp bf16 --channels-last --json "$OUT/benchmark_compile_bf16.json"

echo "GPU check done: $OUT"
