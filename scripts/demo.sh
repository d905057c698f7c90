#!/usr/bin/env bash
# Sets up the environment (once), trains a narrow RAVLT-T on DIGITS (scikit-learn's handwritten digits,
# shipped inside the package) on the CPU, then evaluates the checkpoint it wrote (whose model flags come with it).
#   bash scripts/demo.sh [OUTPUT_DIR]        (default: output/demo_digits)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
out="${1:-output/demo_digits}"
# The demo's convolutions are tiny: one thread per process is about as fast and does not slow down
# when other processes share the cores. Set OMP_NUM_THREADS to override.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python main.py --config configs/demo_digits.yaml --output_dir "$out"
python main.py --eval --resume "$out/checkpoint.pth" --device cpu --num_workers 0 --output_dir "$out"
