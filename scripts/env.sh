#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment: exactly requirements.txt (the pinned versions
# the README's figures were measured with). It is keyed by the hash of requirements.txt and lives under
# ${RAVLT_VENV_ROOT:-~/.cache/ravlt}, so clones share it; this clone's folder goes on PYTHONPATH, so the
# entry points, scripts and tests import this clone's code (nothing of the project is installed into it).
# Source it: `source scripts/env.sh`.
_ravlt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_ravlt_hash="$(sha256sum "$_ravlt_root/requirements.txt" | cut -c1-12)"
_ravlt_venv="${RAVLT_VENV_ROOT:-$HOME/.cache/ravlt}/venv-$_ravlt_hash"
if [ ! -x "$_ravlt_venv/bin/python" ] || [ ! -f "$_ravlt_venv/.complete" ]; then
    echo "Creating the virtual environment in $_ravlt_venv (once; PyTorch is large) ..."
    rm -rf "$_ravlt_venv"
    python3 -m venv "$_ravlt_venv"
    "$_ravlt_venv/bin/python" -m pip install --quiet --upgrade pip
    "$_ravlt_venv/bin/python" -m pip install --quiet -r "$_ravlt_root/requirements.txt"
    touch "$_ravlt_venv/.complete"
fi
source "$_ravlt_venv/bin/activate"
export PYTHONPATH="$_ravlt_root${PYTHONPATH:+:$PYTHONPATH}"
unset _ravlt_root _ravlt_hash _ravlt_venv
