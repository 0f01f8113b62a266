#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command: the gpu-marked tests, a few hundred CUDA training steps,
# export with parity on every runtime that starts, PyTorch-on-CUDA codes against ONNX Runtime on the CPU, and
# `vqtool bench` with every backend that starts. Installs nothing and needs no network: it runs the working tree
# (PYTHONPATH) with whatever is installed; PyTorch with CUDA is the only requirement. Under 8 minutes.
#
#   bash scripts/gpu-check.sh [REPORT.md]     (default: gpu-check-report.md, or $OUT/gpu-check-report.md)
set -uo pipefail
cd "$(dirname "$0")/.."
report="${1:-${OUT:-.}/gpu-check-report.md}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" scripts/gpu_check.py --report "$report"
