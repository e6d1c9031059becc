#!/usr/bin/env bash
# Megatron-Core 0.19.x's Python code in a folder, to put in front of the installed 0.16.1 with
# PYTHONPATH: what clusters run (NGC containers, Python 3.12), loaded on this Python 3.11.
# 0.17+ publish wheels for Python >= 3.12 only, so the wheel is downloaded for 3.12 and
# unpacked; its compiled dataset helper (Megatron-LM's GPT dataset) is never imported by us.
# 0.19 imports triton unconditionally (transformer/moe/ops), so triton goes in the folder too.
# Usage: .ci/mcore_overlay.sh DIR [VERSION]   -> DIR/megatron, DIR/triton, DIR/*.dist-info
set -euo pipefail
dir=${1:?usage: .ci/mcore_overlay.sh DIR [VERSION]}
version=${2:-0.19.2}
if [ -f "$dir/.complete-$version" ]; then exit 0; fi
rm -rf "$dir" && mkdir -p "$dir/wheels"
pip download --quiet --no-deps --python-version 3.12 --only-binary=:all: \
  "megatron-core==$version" -d "$dir/wheels"
python -m zipfile -e "$dir"/wheels/megatron_core-*.whl "$dir"
pip install --quiet --no-deps --target "$dir" "triton>=3.0"
rm -rf "$dir/wheels"
touch "$dir/.complete-$version"
