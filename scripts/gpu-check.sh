#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command: the gpu-marked tests, a few hundred CUDA training steps,
# export with parity on every runtime that starts, PyTorch-on-CUDA codes against ONNX Runtime on the CPU (the
# default model, and each imported family's CI toy where diffusers/transformers are installed), and
# `vqtool bench` with every backend that starts. Installs nothing and needs no network: it runs the working tree
# with whatever is installed, laid out as an install would lay it (vqtool/ with train/ and export/ inside, as
# a copy in a temporary folder on PYTHONPATH: scripts/installed-layout.sh); PyTorch with CUDA is the only requirement. Under 8 minutes.
#
#   bash scripts/gpu-check.sh [REPORT.md]     (default: gpu-check-report.md, or $OUT/gpu-check-report.md)
set -uo pipefail
cd "$(dirname "$0")/.."
report="${1:-${OUT:-.}/gpu-check-report.md}"
site=$(bash scripts/installed-layout.sh)
trap 'rm -rf "$site"' EXIT
PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" scripts/gpu_check.py --report "$report"
