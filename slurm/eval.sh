#!/usr/bin/env bash
# mm1-eval on one node of 8 GPUs: each model spans --tp x --ep ranks, the other ranks split
# the queries (docs/evaluation.md). Every argument but --dry-run goes to mm1-eval:
#   sbatch slurm/eval.sh --run-dir runs/mm1-30b --tp 8 --suite paper-fewshot \
#          --benchmarks-root /data/bench --table results/mm1-30b-table3.md
#   sbatch slurm/eval.sh --run-dir runs/mm1-3b-moe64 --ep 8 --suite paper-fewshot ...
#   bash slurm/eval.sh --dry-run ARGS      # the srun command, anywhere
# A pipeline-parallel run's in-training evaluation submits it per checkpoint with
#   eval.side_job="sbatch --parsable slurm/eval.sh"
# Environment: CONTAINER_IMAGE, CONTAINER_MOUNTS (add the benchmarks' folder), PYTHON,
# SRUN_EXTRA_ARGS, MASTER_ADDR / MASTER_PORT, as for training (slurm/job_env.sh).
#SBATCH --job-name=mm1-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
set -euo pipefail

# sbatch runs a spooled copy of this file: find slurm/ through Slurm's record of the original.
here=$(dirname "$0")
[ -f "$here/job_env.sh" ] ||
  here=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")
REPO=$(cd "$here/.." && pwd)

DRY_RUN=${DRY_RUN:-0}
ARGS=()
RUN_DIR=
previous=
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    *) ARGS+=("$arg") ;;
  esac
  # The run's folder (given, or above the checkpoint) is mounted into the container.
  case $previous in
    --run-dir) RUN_DIR=$arg ;;
    --checkpoint) RUN_DIR=$(dirname "$(dirname "$arg")") ;;
  esac
  previous=$arg
done
[ -z "$RUN_DIR" ] || case $RUN_DIR in /*) ;; *) RUN_DIR=${SLURM_SUBMIT_DIR:-$PWD}/$RUN_DIR ;; esac
source "$REPO/slurm/job_env.sh"

EVAL=(srun --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --kill-on-bad-exit=1
      "${CONTAINER[@]}" "${SRUN_EXTRA[@]}"
      "$PYTHON" -m mm1_megatron.evaluation.cli "${ARGS[@]}")
echo "mm1-eval: nodes=$NODES tasks/node=$TASKS_PER_NODE gpus/node=$GPUS_PER_NODE" \
     "world=$WORLD_SIZE_PLANNED job=${SLURM_JOB_ID:-none} master=$MASTER_ADDR:$MASTER_PORT"
echo "mm1-eval: $(printf '%q ' "${EVAL[@]}")"
if [ "$DRY_RUN" != 0 ]; then
  echo "mm1-eval: dry run, nothing launched"
  exit 0
fi
if [ "$IN_SLURM" = 0 ]; then
  echo "mm1-eval: not inside a Slurm job: submit with sbatch $0, or pass --dry-run" >&2
  exit 2
fi
exec "${EVAL[@]}"
