#!/usr/bin/env bash
# Set up a virtual environment (CPU PyTorch pinned by constraints/ci.txt) and run the checks.
# README's test command and .ci/run both run exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[train,dev,fast-png,openvino,import,docs,ray]' -c constraints/ci.txt
# The stubs' metadata requires the real tensorrt wheel, which cannot install without a GPU index.
.venv/bin/python -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
# The dependency direction (pyproject's [tool.importlinter]), checked on the checkout itself: vqtool/train and
# vqtool/export are links to the top-level folders, so the checkout is laid out as an install lays it.
.venv/bin/lint-imports
# The types, across the package (pyproject's [tool.mypy]); tests/test_tensorrt.py also checks the TensorRT code
# strictly, against the real API's stubs.
.venv/bin/mypy vqtool
# The documentation site: a broken link, a missing anchor or a page left out of the navigation fails here.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
# One worker per core, and so one PyTorch thread per worker: two threads in each of two workers on two cores
# contend (OpenMP spins while it waits for the other core; docs/design-measurements.md).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# One worker per core (pytest-xdist), a test file's tests in one worker so that its module fixtures are built once;
# much of the suite waits on imports, tracing and child processes, so two workers on two cores overlap well. Files
# go to the workers in collection order, which tests/conftest.py sets longest first.
.venv/bin/python -m pytest -n auto --dist loadfile --no-loadscope-reorder "$@"
