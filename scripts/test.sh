#!/usr/bin/env bash
# Sets up the environment (once) and runs the tests on the CPU, in one of two tiers (markers in pytest.ini):
#   bash scripts/test.sh           the fast tier: every test not marked slow or distributed (75 s on 2 idle
#                                  cores; the same as a plain `python -m pytest`)
#   bash scripts/test.sh --full    every test (CI runs this: .ci/run)
# Other arguments pass through to pytest: `bash scripts/test.sh tests/test_model.py -k golden`,
# `bash scripts/test.sh -m distributed` (one marker's tests). The tier applies to the tests named too:
# `bash scripts/test.sh --full tests/test_train_resume.py` runs that file's slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
args=()
for arg in "$@"; do
    if [ "$arg" = --full ]; then
        args+=(-m '')  # an empty marker expression selects every test
    else
        args+=("$arg")
    fi
done
python -m pytest -q ${args[@]+"${args[@]}"}
