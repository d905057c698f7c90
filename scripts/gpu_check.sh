#!/usr/bin/env bash
# What one CUDA GPU can check of the training paths, in one go, with the machine's own Python (a GPU node often
# has torch, torchvision and timm installed and no package index): packages it lacks come from wheels carried
# beside this script (WHEELS, default .gpu_wheels/, made by `bash scripts/gpu_check.sh --prepare` where pip can
# download). Sized for under 8 minutes on one H100-class GPU (tiny models and synthetic data, but for the
# benchmark). Every result goes under OUT (default output/gpu_check/<date>-<time>):
#   env.txt               python, torch, the GPU; which backend two processes on one GPU use (NCCL if it takes
#                         two ranks on one device, else gloo)
#   pytest.txt            the tests that need CUDA (RALA's dtypes under real CUDA autocast ...)
#   stop/                 two processes, loader workers, fp16, --deterministic: a run never stopped; the same run
#                         stopped by SIGTERM to every process (torchrun, the training processes, their loader
#                         workers) in epoch 1 and started again; resume_exact.txt: bit-identical or not
#   amp_fp16/, amp_bf16/  one process, a short run in each precision
#   compile_ddp/          two processes with --compile (DDP inside torch.compile)
#   host_syncs.json       host synchronisations of 32 fp16 training steps (at most one per --print-freq steps)
#   benchmark.json        RAVLT-S against the authors' implementation (AUTHORS_FILE=path/to/RALA.py), bf16, batch
#                         128: img/s and peak memory, eval and train
#   steps.txt             each step's exit code and the expected one
#
#   bash scripts/gpu_check.sh --prepare     # here, with pip and a network: the wheels for the GPU node
#   bash scripts/gpu_check.sh               # there: PYTHON (default python3), WHEELS, OUT, AUTHORS_FILE
#   DRY_RUN=1 bash scripts/gpu_check.sh     # print the commands, run nothing
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.gpu_wheels}"
NEEDED=(fvcore iopath yacs termcolor)  # pure Python: what main.py needs beyond a GPU node's usual packages
if [ "${1:-}" = --prepare ]; then
    mkdir -p "$WHEELS"
    exec "$PYTHON" -m pip wheel --no-deps --wheel-dir "$WHEELS" fvcore==0.1.5.post20221221 iopath==0.1.10 \
        yacs==0.1.8 termcolor==3.1.0
fi
OUT="${OUT:-output/gpu_check/$(date +%Y%m%d-%H%M%S)}"
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu rehearses the steps that need no GPU (tests/test_gpu_check.py)
FAILED=0

run() {  # run [--expect CODE] NAME COMMAND...: record the exit code; a failure marks the check failed
    local expected=0
    if [ "$1" = --expect ]; then expected="$2"; shift 2; fi
    local name="$1"
    shift
    echo "+ $(printf '%q ' "$@")"
    [ -n "${DRY_RUN:-}" ] && return 0
    local code=0
    "$@" > "$OUT/$name.log" 2>&1 || code=$?
    echo "$name: exit $code (expected $expected)" | tee -a "$OUT/steps.txt"
    [ "$code" = "$expected" ] || FAILED=1
}

descendants() {  # every process a process started, its loader workers included
    local child
    for child in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

echo "Results: $OUT"
if [ -z "${DRY_RUN:-}" ]; then
    mkdir -p "$OUT"
    missing=$(for p in "${NEEDED[@]}"; do "$PYTHON" -c "import $p" 2>/dev/null || echo "$p"; done)
    if [ -n "$missing" ]; then
        if ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
            echo "error: $PYTHON lacks $(echo $missing) and $WHEELS/ holds no wheels: run 'bash scripts/gpu_check.sh --prepare' where pip can download, and carry $WHEELS/ here" >&2
            exit 2
        fi
        SITE="$(mktemp -d)"
        "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl || exit 2
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" - > "$OUT/env.txt" 2>&1 <<EOF || { cat "$OUT/env.txt"; exit 2; }
import sys, torch, timm, fvcore
print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__)
if '$DEVICE' == 'cuda':
    assert torch.cuda.is_available(), 'no CUDA device is visible'
    print(torch.cuda.get_device_name(), 'CUDA', torch.version.cuda)
EOF
fi
BACKEND=gloo
if [ "$DEVICE" = cuda ] && [ -z "${DRY_RUN:-}" ] && "$PYTHON" - >> "$OUT/env.txt" 2>&1 <<'EOF'
import os, torch, torch.distributed as dist, torch.multiprocessing as mp
def rank(r):
    dist.init_process_group('nccl', init_method='tcp://127.0.0.1:29517', rank=r, world_size=2)
    x = torch.ones(1, device='cuda')
    dist.all_reduce(x)
    assert x.item() == 2
    dist.destroy_process_group()
mp.spawn(rank, nprocs=2)
EOF
then BACKEND=nccl; fi
[ -z "${DRY_RUN:-}" ] && echo "two processes on one GPU: $BACKEND" >> "$OUT/env.txt"

TINY='{"embed_dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 4], "projection_dim": 64}'
SIZE=64
[ "$DEVICE" = cpu ] && SIZE=32
CLS=(--model RAVLT_T --model-kwargs "$TINY" --data-set FAKE --input-size "$SIZE" --batch-size 32 --epochs 2
     --warmup-epochs 1 --device "$DEVICE" --num_workers 2 --print-freq 4 --save-freq 0 --model-ema-warmup)
TWO=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2)
AMP=fp16
[ "$DEVICE" = cpu ] && AMP=none
STOP=("${CLS[@]}" --dist-backend "$BACKEND" --deterministic --amp "$AMP" --clip-grad 1.0 --model-ema-force-cpu)

if [ "$DEVICE" = cuda ]; then
    run pytest "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests/test_reference.py tests/test_benchmark.py
fi
run stop_reference "${TWO[@]}" main.py "${STOP[@]}" --output_dir "$OUT/stop/reference"
echo "+ SIGTERM to every process in epoch 1, then the same command again"
if [ -z "${DRY_RUN:-}" ]; then
    "${TWO[@]}" main.py "${STOP[@]}" --output_dir "$OUT/stop/resumed" > "$OUT/stop_stopped.log" 2>&1 &
    LAUNCHER=$!
    for _ in $(seq 600); do grep -q 'Epoch: \[1\] \[ *3/' "$OUT/stop_stopped.log" && break; sleep 0.5; done
    kill -TERM "$LAUNCHER" $(descendants "$LAUNCHER") 2> /dev/null
    wait "$LAUNCHER"
    # rank 0 says where it stopped; no training process reports an error
    if grep -q '^\[rank 0\] stopped: SIGTERM received during epoch 1' "$OUT/stop_stopped.log" \
        && ! grep -q '^\[rank [0-9]*\] error' "$OUT/stop_stopped.log"; then
        echo "stop_stopped: stopped and saved" | tee -a "$OUT/steps.txt"
    else
        echo "stop_stopped: NOT stopped as expected" | tee -a "$OUT/steps.txt"
        FAILED=1
    fi
fi
run stop_resumed "${TWO[@]}" main.py "${STOP[@]}" --output_dir "$OUT/stop/resumed"
run resume_exact "$PYTHON" scripts/compare_checkpoints.py "$OUT/stop/reference/checkpoint.pth" \
    "$OUT/stop/resumed/checkpoint.pth"
if [ "$DEVICE" = cuda ]; then
    for amp in fp16 bf16; do
        run "amp_$amp" "$PYTHON" main.py "${CLS[@]}" --epochs 1 --amp "$amp" --output_dir "$OUT/amp_$amp"
    done
    run compile_ddp "${TWO[@]}" main.py "${CLS[@]}" --epochs 1 --amp bf16 --dist-backend "$BACKEND" --compile \
        --output_dir "$OUT/compile_ddp"
    run host_syncs "$PYTHON" scripts/host_syncs.py --json "$OUT/host_syncs.json" -- "${CLS[@]}" --epochs 1 \
        --amp fp16 --output_dir "$OUT/host_syncs"
    if [ -n "${AUTHORS_FILE:-}" ]; then
        run benchmark "$PYTHON" scripts/benchmark.py --device cuda --model RAVLT_S authors:RAVLT_S --mode eval train \
            --batch-size 128 --amp bf16 --memory --iters 10 --authors-file "$AUTHORS_FILE" --json "$OUT/benchmark.json"
    else
        echo "benchmark: skipped (no AUTHORS_FILE)" | tee -a "$OUT/steps.txt"
    fi
fi
echo "GPU check done: $OUT"
exit "$FAILED"
