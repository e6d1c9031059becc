#!/usr/bin/env bash
# Node health check, run by slurm/common.sh as one srun task per node before training (inside the
# container when there is one). Fails the job early, naming the node, instead of a hang or a
# crash minutes into a 256-GPU start-up.
#
# usage: node_check.sh GPUS_PER_NODE RUN_DIR MIN_FREE_GB PYTHON
#   GPUS_PER_NODE 0 (a CPU job) skips the GPU checks. Otherwise nvidia-smi (when installed) must
#   answer and list at least that many GPUs, and torch must see them.
set -euo pipefail
gpus=${1:?GPUS_PER_NODE}; run_dir=${2:?RUN_DIR}; min_free_gb=${3:?MIN_FREE_GB}; python=${4:?PYTHON}
host=$(hostname)
fail() { echo "node_check $host: FAILED: $*" >&2; exit 1; }

seen="-"
if [ "$gpus" -gt 0 ]; then
  if command -v nvidia-smi >/dev/null; then
    listing=$(nvidia-smi -L 2>&1) || fail "nvidia-smi does not work: $listing"
    seen=$(grep -c '^GPU ' <<< "$listing" || true)
    [ "$seen" -ge "$gpus" ] || fail "nvidia-smi lists $seen GPUs, the job asked for $gpus per node"
  else
    echo "node_check $host: no nvidia-smi here; checking the GPUs through torch only" >&2
  fi
fi

mkdir -p "$run_dir"
free_gb=$(df -Pk "$run_dir" | awk 'NR == 2 { print int($4 / 1048576) }')
[ "$free_gb" -ge "$min_free_gb" ] ||
  fail "$free_gb GB free in $run_dir, want at least $min_free_gb (MM1_MIN_FREE_GB)"

"$python" - "$gpus" <<'PY' || fail "python environment ($python) is not usable for training"
import sys

import megatron.core  # noqa: F401
import torch

import mm1_megatron.cli  # noqa: F401

want = int(sys.argv[1])
if want > 0 and torch.cuda.device_count() < want:
    sys.exit(f"torch sees {torch.cuda.device_count()} CUDA devices, the job asked for {want}")
PY

echo "node_check $host: ok (gpus ${seen}/${gpus}, ${free_gb} GB free in $run_dir, python ok)"
