# Shared part of the MM1 Slurm scripts; sourced by slurm/mm1_*.sh after they set PRESET.
#
#   sbatch slurm/mm1_30b.sh [key.sub=value ...]     # overrides go to mm1-train
#   bash slurm/mm1_30b.sh --dry-run [key.sub=value ...]              # anywhere, Slurm or not
#
# What a job does: a health check on every node (one task per node), then
#   srun python launch/train.py --preset $PRESET run_dir=$RUN_DIR [overrides]
# with one task per GPU; ranks come from Slurm's variables (mm1_megatron/runtime/distributed.py).
# Preemption: `--signal=USR1@600` (no "B:") makes Slurm send SIGUSR1 to the job's steps, i.e. to
# the trainer, 10 minutes before the time limit (`scancel --signal=USR1 JOBID` does the same at
# once: by default scancel signals every step but the batch shell). The trainer checkpoints and
# exits 75; this script then runs `scontrol requeue`, and the requeued job resumes from the
# latest checkpoint in the same run_dir.
#
# Script arguments (everything else is passed to mm1-train as a config override):
#   --dry-run          (or DRY_RUN=1) print the plan and the srun commands, launch nothing
#   --preset NAME      (or MM1_PRESET=NAME) replace the script's preset, e.g. tiny for tests
#   run_dir=PATH       (or RUN_DIR=PATH) default runs/<preset> under the submit directory
# Environment (all optional):
#   CONTAINER_IMAGE    run every step in this image through pyxis/enroot (e.g. an NGC PyTorch
#                      image with this repo's requirements installed); unset: run directly
#   CONTAINER_MOUNTS   pyxis mounts, default "$REPO:$REPO"; run_dir is always added
#   PYTHON             interpreter for the tasks (default python)
#   MASTER_ADDR, MASTER_PORT   rendezvous; default first node of the job, port from the job id
#   MM1_MIN_FREE_GB    free space the health check wants in run_dir (default 100)
#   MM1_SKIP_NODE_CHECK=1      skip the health check
#   SRUN_EXTRA_ARGS    more srun options for the training step (e.g. "--label --cpu-bind=none")
# The layouts (tp/pp/ep, micro-batch, recompute, fp8) and the node count they were planned for
# live in the presets (mm1_megatron/config/presets.py), never here.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The trainer's exit status for "checkpoint written, requeue me": EXIT_PREEMPTED in
# mm1_megatron/train/callbacks.py (tests/slurm checks the two agree). Defined here rather than
# read from python because the batch shell may run outside the container that has python.
EXIT_PREEMPTED=75

# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
: "${PRESET:?the per-variant script sets PRESET before sourcing common.sh}"
PRESET=${MM1_PRESET:-$PRESET}
DRY_RUN=${DRY_RUN:-0}
RUN_DIR=${RUN_DIR:-}
OVERRIDES=()
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --preset) PRESET=${2:?--preset needs a name}; shift ;;
    --preset=*) PRESET=${1#--preset=} ;;
    run_dir=*) RUN_DIR=${1#run_dir=} ;;
    -h|--help) sed -n '1,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
    *) OVERRIDES+=("$1") ;;
  esac
  shift
done
[ "$DRY_RUN" = 0 ] || DRY_RUN=1

# Same run_dir on every (re)start of the job, so a requeued job resumes from its checkpoint.
# Relative paths are taken from the submit directory (the job's working directory).
RUN_DIR=${RUN_DIR:-runs/$PRESET}
case $RUN_DIR in /*) ;; *) RUN_DIR=${SLURM_SUBMIT_DIR:-$PWD}/$RUN_DIR ;; esac

# ---------------------------------------------------------------------------------------------
# Job shape, rendezvous, NCCL / threads environment, container: shared with slurm/eval.sh
# ---------------------------------------------------------------------------------------------
source "$REPO/slurm/job_env.sh"

NODE_CHECK=(srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1
            "${CONTAINER[@]}" bash "$REPO/slurm/node_check.sh" "$GPUS_PER_NODE" "$RUN_DIR"
            "$MM1_MIN_FREE_GB" "$PYTHON")
# --kill-on-bad-exit=0: after a preemption every rank exits 75 together; killing the slower
# ranks when the first one exits would turn srun's status into 137 (a killed task) and lose the
# requeue. A crashed rank still ends the job: its peers' collectives fail (NCCL async error
# handling, gloo connection reset) and they exit too.
TRAIN=(srun --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --kill-on-bad-exit=0
       "${CONTAINER[@]}" "${SRUN_EXTRA[@]}"
       "$PYTHON" "$REPO/launch/train.py" --preset "$PRESET" "run_dir=$RUN_DIR" "${OVERRIDES[@]}")

quoted() { printf '%q ' "$@"; echo; }

echo "mm1: preset=$PRESET nodes=$NODES tasks/node=$TASKS_PER_NODE gpus/node=$GPUS_PER_NODE" \
     "world=$WORLD_SIZE_PLANNED run_dir=$RUN_DIR"
echo "mm1: job=${SLURM_JOB_ID:-none} restarts=${SLURM_RESTART_COUNT:-0}" \
     "master=$MASTER_ADDR:$MASTER_PORT container=${CONTAINER_IMAGE:-none}"

# ---------------------------------------------------------------------------------------------
# Dry run: plan (layout, parameters, the 80 GB memory check) and the commands
# ---------------------------------------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  PLAN=("$PYTHON" "$REPO/tools/plan.py" --preset "$PRESET" --nodes "$NODES"
        --gpus-per-node "$TASKS_PER_NODE" --check "${OVERRIDES[@]}")
  echo "mm1: plan: $(quoted "${PLAN[@]}")"
  plan_status=0
  "${PLAN[@]}" || plan_status=$?
  echo "mm1: node check: $(quoted "${NODE_CHECK[@]}")"
  echo "mm1: train: $(quoted "${TRAIN[@]}")"
  if [ "$plan_status" = 0 ]; then
    echo "mm1: dry run, nothing launched"
  else
    echo "mm1: dry run: the plan failed (status $plan_status; 1: the layout does not fit)" >&2
  fi
  exit "$plan_status"
fi

if [ "$IN_SLURM" = 0 ]; then
  echo "mm1: not inside a Slurm job: submit with sbatch $0, or pass --dry-run" >&2
  exit 2
fi
mkdir -p "$RUN_DIR"

# ---------------------------------------------------------------------------------------------
# Health check, training, requeue
# ---------------------------------------------------------------------------------------------
if [ "$MM1_SKIP_NODE_CHECK" != 1 ]; then
  echo "mm1: node check: $(quoted "${NODE_CHECK[@]}")"
  "${NODE_CHECK[@]}" || { echo "mm1: node health check failed; not training" >&2; exit 1; }
fi

echo "mm1: train: $(quoted "${TRAIN[@]}")"
status=0
"${TRAIN[@]}" || status=$?

case $status in
  0)
    echo "mm1: training finished"
    exit 0 ;;
  "$EXIT_PREEMPTED" | $(( 128 + 10 )) | $(( 128 + 15 )))
    # 75: the trainer got SIGUSR1/SIGTERM, wrote a checkpoint and exited for a requeue, or
    # its hang watchdog found a step that never completed (stacks in $RUN_DIR/hang/).
    # 138/143: the signal came before the trainer installed its handlers (during start-up),
    # so there is nothing new to save; the requeued job resumes from the last checkpoint.
    echo "mm1: trainer exited for a requeue (status $status); requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
      # slurmctld ends this run of the batch script and queues the job again (it holds a
      # requeued job about two minutes before it may start); exit 0 so nothing marks it failed.
      exit 0
    fi
    echo "mm1: scontrol requeue failed (job submitted with --no-requeue?); resubmit the same" \
         "script to resume from $RUN_DIR" >&2
    exit "$EXIT_PREEMPTED" ;;
  *)
    echo "mm1: training failed with status $status (3: too many NaN/Inf steps; see the log)" >&2
    exit "$status" ;;
esac
