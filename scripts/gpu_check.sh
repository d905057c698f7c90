#!/usr/bin/env bash
# What one CUDA GPU can check of the training paths, in one go (sized for well under 8 minutes on one
# H200-class GPU: tiny models, synthetic data), each run into a fresh folder OUTPUT_ROOT/<date>-<time>-<pid>
# (default OUTPUT_ROOT: output/gpu_check), every result under it:
#   pytest.txt            the tests that need CUDA (pytest -k cuda)
#   host_syncs.json       host synchronisations of 32 fp16 training steps (CUDA sync debug mode; fails above one
#                         per --print-freq steps and one per epoch)
#   cls_reference/        two processes on the one GPU (gloo with CUDA tensors), --deterministic, fp16, --clip-grad,
#                         --model-ema-force-cpu: two epochs never stopped
#   cls_resumed/          the same run stopped by SIGTERM in epoch 1, then started again
#   resume_exact.txt      whether cls_resumed ends bit-identical to cls_reference (weights, EMA, optimizer)
#   cls_bf16/             one process, bf16, cuDNN benchmarking (no --deterministic)
#   cls_bf16_compile/     the same with --compile (Inductor, triton kernels)
#   det/, seg/            main_det.py (Mask R-CNN) and main_seg.py (Semantic FPN), two processes on the GPU
#   benchmark_*.json      with BENCHMARK=1 only: scripts/benchmark.py in fp32, fp16, bf16 and under torch.compile
#                         (several more minutes; AUTHORS_FILE=path/to/RALA.py adds the authors' model)
# NCCL needs one GPU per process, so it is not exercised with one GPU.
#
#   bash scripts/gpu_check.sh [OUTPUT_ROOT]
#   DRY_RUN=1 bash scripts/gpu_check.sh     # print the commands, run nothing
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUT="${1:-output/gpu_check}/$(date +%Y%m%d-%H%M%S)-$$"
BATCH="${BATCH:-128}"

FAILED=0

# Run a step (print it; with DRY_RUN only print it); a failure is recorded in $OUT/steps.txt and the check goes
# on. step_expecting NAME CODE ... records the exit code of a step that is meant to fail (a stop signal).
step() {
    step_expecting "" 0 "$@"
}

step_expecting() {
    local name="$1" expected="$2"
    shift 2
    echo "+ $(printf '%q ' "$@")"
    if [ -z "${DRY_RUN:-}" ]; then
        local code=0
        "$@" || code=$?
        echo "$code (expected $expected) $*" >> "$OUT/steps.txt"
        if [ "$code" != "$expected" ]; then
            echo "step failed with exit code $code (expected $expected): $*"
            FAILED=1
        fi
    fi
}

if [ -z "${DRY_RUN:-}" ]; then
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device is visible; this script checks the GPU paths')"
    mkdir -p "$OUT"
fi
echo "Results: $OUT"

TINY='{"embed_dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 4], "projection_dim": 64}'
CLS=(--model RAVLT_T --model-kwargs "$TINY" --data-set FAKE --input-size 64 --batch-size 32 --epochs 2
     --warmup-epochs 1 --device cuda --num_workers 2 --print-freq 4 --save-freq 0 --model-ema-warmup)
TWO_ON_ONE=(torchrun --standalone --nproc_per_node=2)

step bash -o pipefail -c "python -m pytest -q -k cuda tests/ 2>&1 | tee '$OUT/pytest.txt'"

step python scripts/host_syncs.py --json "$OUT/host_syncs.json" -- "${CLS[@]}" --epochs 1 --amp fp16 \
    --output_dir "$OUT/host_syncs"

EXACT=(--dist-backend gloo --deterministic --amp fp16 --clip-grad 1.0 --model-ema-force-cpu)
step "${TWO_ON_ONE[@]}" main.py "${CLS[@]}" "${EXACT[@]}" --output_dir "$OUT/cls_reference"
# Rank 0 sends itself SIGTERM before the run's step 20 (epoch 1, step 4 of 16): every process stops at step 8.
step_expecting cls_stopped 1 env SIGNAL_AT=0:20:SIGTERM "${TWO_ON_ONE[@]}" tests/fault_injection.py main.py \
    "${CLS[@]}" "${EXACT[@]}" --output_dir "$OUT/cls_resumed"
step "${TWO_ON_ONE[@]}" main.py "${CLS[@]}" "${EXACT[@]}" --output_dir "$OUT/cls_resumed"
step bash -o pipefail -c "python scripts/compare_checkpoints.py '$OUT/cls_reference/checkpoint.pth' \
'$OUT/cls_resumed/checkpoint.pth' | tee '$OUT/resume_exact.txt'"

step python main.py "${CLS[@]}" --amp bf16 --output_dir "$OUT/cls_bf16"
step python main.py "${CLS[@]}" --amp bf16 --compile --output_dir "$OUT/cls_bf16_compile"

step python -c "import sys, pathlib; sys.path.insert(0, 'tests'); import test_dense as d; \
root = pathlib.Path(sys.argv[1]); d.write_coco(root / 'coco', 'train2017'); d.write_coco(root / 'coco', 'val2017'); \
d.write_ade(root / 'ade', 'training'); d.write_ade(root / 'ade', 'validation', num_images=2)" "$OUT/data"
DENSE=(--model RAVLT_T --model-kwargs "$TINY" --device cuda --dist-backend gloo --num_workers 1 --batch-size 1
       --lr 1e-3 --print-freq 2)
step "${TWO_ON_ONE[@]}" main_det.py --task maskrcnn "${DENSE[@]}" --data-path "$OUT/data/coco" --img-scale 96 64 \
    --epochs 2 --lr-steps 1 --warmup-iters 2 --output_dir "$OUT/det"
step "${TWO_ON_ONE[@]}" main_seg.py --task semfpn "${DENSE[@]}" --data-path "$OUT/data/ade" --num-classes 3 \
    --img-scale 64 48 --crop-size 48 --iters 6 --eval-interval 2 --output_dir "$OUT/seg"

if [ -n "${BENCHMARK:-}" ]; then
    MODELS=(RAVLT_T RAVLT_S)
    AUTHORS=()
    if [ -n "${AUTHORS_FILE:-}" ]; then
        MODELS=(RAVLT_T authors:RAVLT_T RAVLT_S authors:RAVLT_S)
        # shellcheck disable=SC2206  # a space-separated list of folders
        AUTHORS=(--authors-file "$AUTHORS_FILE" --authors-path-extra ${AUTHORS_PATH_EXTRA:-})
    fi
    for amp in none fp16 bf16; do
        step python scripts/benchmark.py --device cuda --model "${MODELS[@]}" convnext_tiny --mode eval train \
            --batch-size "$BATCH" --amp "$amp" --channels-last --memory --matmul-rate \
            --json "$OUT/benchmark_$amp.json" "${AUTHORS[@]}"
    done
    step python scripts/benchmark.py --device cuda --model RAVLT_T RAVLT_S --backend eager compile --mode eval train \
        --batch-size "$BATCH" --amp bf16 --channels-last --json "$OUT/benchmark_compile_bf16.json"
fi

echo "GPU check done: $OUT"
if [ -z "${DRY_RUN:-}" ]; then
    cat "$OUT/steps.txt"
fi
exit "$FAILED"
