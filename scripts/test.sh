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
    if [ ! -x .venv-labelstudio/bin/python ]; then
        "$PYTHON" -m venv .venv-labelstudio
    fi
    # Every version from locks/label-studio.txt (a no-op once installed): label-studio's own ranges are open, and a
    # fresh resolve once brought a sentry-sdk that breaks it at import.
    .venv-labelstudio/bin/python -m pip install --quiet --upgrade pip
    .venv-labelstudio/bin/python -m pip install --quiet "label-studio==$LABEL_STUDIO_VERSION" -c locks/label-studio.txt
    export XDECODER_E2E_LABEL_STUDIO="$PWD/.venv-labelstudio/bin/label-studio"
fi
# The browser test (tests/test_browser.py) drives Debian's Chromium through its ChromeDriver; no browser download.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        chromium chromium-driver; then
        :
    elif [ "${CI:-}" = true ]; then
        echo "scripts/test.sh: could not install chromium and chromium-driver with apt-get; CI needs them" >&2
        exit 1
    else
        echo "scripts/test.sh: chromium and chromium-driver are missing and apt-get (as root) could not install" \
            "them: tests/test_browser.py will skip" >&2
    fi
fi
# The compose checks (tests/test_deploy.py): dclint, which also ships the Compose specification's JSON schema.
if [ ! -x .venv/npm/node_modules/.bin/dclint ]; then
    npm install --silent --no-audit --no-fund --prefix .venv/npm dclint@3.1.0
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
