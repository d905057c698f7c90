#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment: exactly requirements.txt (the versions the
# README's figures were measured with), under ${RAVLT_VENV_ROOT:-~/.cache/ravlt}, keyed by the hash of
# requirements.txt so that clones share it; this clone's folder goes on PYTHONPATH (`import models`; nothing of the
# project is installed into it). Source it: `source scripts/env.sh`.
_ravlt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2> /dev/null; then
    echo "error: Python 3.10 or newer is needed; python3 is $(python3 --version 2>&1)" >&2
    unset _ravlt_root
    return 1 2> /dev/null || exit 1
fi
_ravlt_venv="${RAVLT_VENV_ROOT:-$HOME/.cache/ravlt}/venv-$(sha256sum "$_ravlt_root/requirements.txt" | cut -c1-12)"
if [ ! -x "$_ravlt_venv/bin/python" ] || [ ! -f "$_ravlt_venv/.complete" ]; then
    rm -rf "$_ravlt_venv"
    python3 -m venv "$_ravlt_venv"
    "$_ravlt_venv/bin/python" -m pip install --quiet --upgrade pip
    if ! command -v nvidia-smi > /dev/null 2>&1; then
        # No NVIDIA GPU: PyTorch's CPU-only wheels (about 1 GB) rather than the CUDA build's 6 GB, where that index
        # can be reached; otherwise the default wheels below.
        echo "No NVIDIA GPU: installing PyTorch's CPU-only build into $_ravlt_venv (about 1 GB, once) ..."
        "$_ravlt_venv/bin/python" -m pip install --timeout 10 --retries 0 \
            --index-url https://download.pytorch.org/whl/cpu \
            $(grep -E '^(torch|torchvision)==' "$_ravlt_root/requirements.txt") \
            || echo "(PyTorch's CPU-only index cannot be reached: the default build follows)"
    fi
    echo "Installing requirements.txt into $_ravlt_venv (once; with PyTorch's CUDA build about 6 GB and a few minutes) ..."
    if ! "$_ravlt_venv/bin/python" -m pip install --progress-bar on -r "$_ravlt_root/requirements.txt"; then
        echo "error: installing requirements.txt into $_ravlt_venv failed (pip's message above)" >&2
        unset _ravlt_root _ravlt_venv
        return 1 2> /dev/null || exit 1
    fi
    touch "$_ravlt_venv/.complete"
fi
source "$_ravlt_venv/bin/activate"
export PYTHONPATH="$_ravlt_root${PYTHONPATH:+:$PYTHONPATH}"
unset _ravlt_root _ravlt_venv
