#!/usr/bin/env bash
# Sets up the environment (once) and runs the test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python -m pytest -q "$@"
