#!/usr/bin/env bash
# Lay the working tree out as an install lays it, in a new temporary folder whose path is printed: vqtool/ with
# train/ and export/ inside it (pyproject's package-dir). For tools that read the package from the file system
# (lint-imports) and for running a checkout that is not installed (scripts/gpu-check.sh): put the folder first
# on PYTHONPATH. Copies, not links, so that every tool sees plain files.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d "${TMPDIR:-/tmp}/vqtool-layout.XXXXXX")
mkdir "$site/vqtool"
cp -R vqtool/. "$site/vqtool/"
cp -R train "$site/vqtool/train"
cp -R export "$site/vqtool/export"
find "$site" -name __pycache__ -prune -exec rm -rf {} +
echo "$site"
