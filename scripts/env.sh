#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment, with the dependencies of pyproject.toml
# (the `onnx` and `test` extras included). It is keyed by the hash of pyproject.toml and lives under
# ${RAVLT_VENV_ROOT:-~/.cache/ravlt}, so clones share it; this clone's folder goes on PYTHONPATH (the
# equivalent of `pip install -e .`, without tying the shared environment to one clone).
# Source it: `source scripts/env.sh`.
_ravlt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_ravlt_hash="$(sha256sum "$_ravlt_root/pyproject.toml" | cut -c1-12)"
_ravlt_venv="${RAVLT_VENV_ROOT:-$HOME/.cache/ravlt}/venv-$_ravlt_hash"
if [ ! -x "$_ravlt_venv/bin/python" ] || [ ! -f "$_ravlt_venv/.complete" ]; then
    echo "Creating the virtual environment in $_ravlt_venv (once; PyTorch is large) ..."
    rm -rf "$_ravlt_venv"
    python3 -m venv "$_ravlt_venv"
    "$_ravlt_venv/bin/python" -m pip install --quiet --upgrade pip
    # The dependencies only: the project itself is imported from this clone (PYTHONPATH below).
    "$_ravlt_venv/bin/python" - "$_ravlt_root/pyproject.toml" > "$_ravlt_venv/requirements.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], 'rb'))['project']
print('\n'.join(project['dependencies'] + [d for extra in project['optional-dependencies'].values() for d in extra]))
PY
    "$_ravlt_venv/bin/python" -m pip install --quiet -r "$_ravlt_venv/requirements.txt"
    touch "$_ravlt_venv/.complete"
fi
source "$_ravlt_venv/bin/activate"
export PYTHONPATH="$_ravlt_root${PYTHONPATH:+:$PYTHONPATH}"
unset _ravlt_root _ravlt_hash _ravlt_venv
