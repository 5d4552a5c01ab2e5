#!/usr/bin/env bash
# Create .venv and install xdecoder-ls into it, every dependency at the version of locks/product.txt
# (scripts/lock.sh regenerates it). torch goes in first and pinned: left to the resolver, a bare "torch" requirement
# pulls a multi-GB CUDA build. Set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to choose a build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
EXTRAS="${1:-}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
LOCK=locks/product.txt
.venv/bin/python -m pip install --quiet --upgrade pip -c "$LOCK"
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        .venv/bin/python -m pip install --quiet "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
    else
        .venv/bin/python -m pip install --quiet "torch==$TORCH_VERSION"
    fi
fi
.venv/bin/python -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}" -c "$LOCK"
