#!/usr/bin/env bash
# Set up a virtual environment (CPU PyTorch pinned by constraints/ci.txt) and run the checks.
# README's test command and .ci/run both run exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[train,dev,fast-png,openvino]' -c constraints/ci.txt
# The stubs' metadata requires the real tensorrt wheel, which cannot install without a GPU index.
.venv/bin/python -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
.venv/bin/python -m pytest "$@"
