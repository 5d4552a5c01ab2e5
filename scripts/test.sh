#!/usr/bin/env bash
# Set up (see setup.sh), lint, and run the whole test suite. Extra arguments go to pytest.
# The end-to-end test drives a real Label Studio 1.23.2, installed on first use into its own .venv-labelstudio
# (its pinned dependencies would clash with ours); set XDECODER_E2E_LABEL_STUDIO to use another install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
LABEL_STUDIO_VERSION=1.23.2

bash scripts/setup.sh test
if [ -z "${XDECODER_E2E_LABEL_STUDIO:-}" ]; then
    installed=$(.venv-labelstudio/bin/python -m pip show label-studio 2>/dev/null | sed -n 's/^Version: //p' || true)
    if [ "$installed" != "$LABEL_STUDIO_VERSION" ]; then
        "$PYTHON" -m venv .venv-labelstudio
        .venv-labelstudio/bin/python -m pip install --quiet --upgrade pip
        .venv-labelstudio/bin/python -m pip install --quiet "label-studio==$LABEL_STUDIO_VERSION" "sentry-sdk<3"
    fi
    export XDECODER_E2E_LABEL_STUDIO="$PWD/.venv-labelstudio/bin/label-studio"
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
