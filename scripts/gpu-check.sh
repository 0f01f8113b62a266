#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command: the gpu-marked tests, a few hundred CUDA training steps,
# export with parity on every runtime that starts, PyTorch-on-CUDA codes against ONNX Runtime on the CPU (the
# default model, and each imported family's CI toy where diffusers/transformers are installed), and
# `vqtool bench` with every backend that starts. Installs nothing and needs no network: it runs the working tree
# with whatever is installed (the checkout is laid out as an install lays it: vqtool/train and vqtool/export are
# links to the top-level folders); PyTorch with CUDA is the only requirement. Under 8 minutes.
#
#   bash scripts/gpu-check.sh [REPORT.md]     (default: gpu-check-report.md, or $OUT/gpu-check-report.md)
set -uo pipefail
cd "$(dirname "$0")/.."
report="${1:-${OUT:-.}/gpu-check-report.md}"
# The links that lay the checkout out as an install does, should a copy of the tree have lost them.
for part in train export; do [ -e "vqtool/$part" ] || ln -s "../$part" "vqtool/$part"; done
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" scripts/gpu_check.py --report "$report"
