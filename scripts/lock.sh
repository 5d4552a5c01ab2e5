#!/usr/bin/env bash
# Regenerate the pinned installs with pip-tools (needs PyPI):
#   locks/product.txt       this package, its test extra and torch (locks/product.in), for scripts/setup.sh,
#                           the Dockerfile and CI
#   locks/label-studio.txt  the Label Studio the end-to-end tests install (locks/label-studio.in)
# Then review the diff and run bash scripts/test.sh: tests/test_locks.py checks both environments against these files.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
PIP_TOOLS_VERSION=7.7.0

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$PYTHON" -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet "pip-tools==$PIP_TOOLS_VERSION"
compile=("$tools/venv/bin/pip-compile" --quiet --allow-unsafe --strip-extras --no-emit-index-url
         --no-emit-find-links --no-emit-trusted-host --resolver backtracking)

"${compile[@]}" --extra test --output-file locks/product.txt pyproject.toml locks/product.in
# A local build label (torch==2.13.0+cpu from a wheel on disk) would refuse the CUDA build of the same version.
sed -i -E 's/^(torch==[0-9.]+)\+[A-Za-z0-9.]+/\1/' locks/product.txt
"${compile[@]}" --output-file locks/label-studio.txt locks/label-studio.in
echo "locks/product.txt: $(grep -c '==' locks/product.txt) pins; locks/label-studio.txt: $(grep -c '==' locks/label-studio.txt) pins"
