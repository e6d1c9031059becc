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
# Job shape: from Slurm inside a job, else from this script's #SBATCH lines (dry-run anywhere)
# ---------------------------------------------------------------------------------------------
sbatch_option() {  # value of "#SBATCH --NAME=VALUE" in the submitted script, e.g. nodes
  sed -n "s/^#SBATCH[[:space:]]\{1,\}--$1=\([^[:space:]]*\).*/\1/p" "$0" | head -n1
}
count() { echo "${1##*:}"; }  # "h100:8" -> 8

IN_SLURM=0
[ -n "${SLURM_JOB_ID:-}" ] && IN_SLURM=1
if [ "$IN_SLURM" = 1 ]; then
  NODES=$SLURM_JOB_NUM_NODES
  TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$(( SLURM_NTASKS / SLURM_JOB_NUM_NODES ))}
  GPUS_PER_NODE=$(count "${SLURM_GPUS_PER_NODE:-0}")
else
  NODES=$(sbatch_option nodes); NODES=${NODES:-1}
  TASKS_PER_NODE=$(sbatch_option ntasks-per-node); TASKS_PER_NODE=${TASKS_PER_NODE:-1}
  GPUS_PER_NODE=$(count "$(sbatch_option gpus-per-node)"); GPUS_PER_NODE=${GPUS_PER_NODE:-0}
fi
WORLD_SIZE_PLANNED=$(( NODES * TASKS_PER_NODE ))

# ---------------------------------------------------------------------------------------------
# Environment: every default can be overridden by exporting the variable before sbatch
# ---------------------------------------------------------------------------------------------
# Rendezvous: rank 0 listens on the first node. The port is derived from the job id exactly as
# mm1_megatron/runtime/distributed.py does without MASTER_PORT (SLURM_PORT_BASE + job id %
# SLURM_PORT_SPAN; tests/slurm checks they agree), so concurrent jobs on a node rarely collide
# and a requeued job (same id) uses the same port.
if [ "$IN_SLURM" = 1 ]; then
  : "${MASTER_ADDR:=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"
  : "${MASTER_PORT:=$(( 15000 + SLURM_JOB_ID % 15000 ))}"
else
  : "${MASTER_ADDR:=<first host of SLURM_JOB_NODELIST>}"
  : "${MASTER_PORT:=<15000 + SLURM_JOB_ID % 15000>}"
fi
export MASTER_ADDR MASTER_PORT
# Ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID in each task; torchrun-style
# variables left over in the submitting shell would take precedence, so drop them.
unset RANK WORLD_SIZE LOCAL_RANK

# Megatron-Core's TP/SP communication overlap relies on kernels being issued in order on one
# hardware queue; Megatron refuses some overlaps without it.
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
# A failed or timed-out NCCL collective aborts the process (and so the job) instead of hanging.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
# Let the caching allocator free memory of async collectives without recordStream (less
# fragmentation with overlapped grad-reduce/param-gather).
: "${TORCH_NCCL_AVOID_RECORD_STREAMS:=1}"
# InfiniBand: wait longer before declaring a queue pair dead (4.096us * 2^22 ~ 17 s), so a
# congested fabric at 32+ nodes does not kill the job.
: "${NCCL_IB_TIMEOUT:=22}"
# NVLink SHARP (NVSwitch reductions) pins extra GPU memory per communicator; off by default to
# keep the 80 GB budget the layouts were planned with. Set 1 to try it.
: "${NCCL_NVLS_ENABLE:=0}"
# WARN keeps logs readable; INFO (plus NCCL_DEBUG_SUBSYS=INIT,NET) to debug topology/IB issues.
: "${NCCL_DEBUG:=WARN}"
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA / GLOO_SOCKET_IFNAME are site-specific: left unset unless
# given (NCCL picks the interfaces itself; export them to pin the bootstrap/IB devices).
# Console lines reach the job log as they are printed.
: "${PYTHONUNBUFFERED:=1}"
# Intra-op threads per rank: the node's CPUs shared by its tasks (torch would take them all).
CPUS_ON_NODE=${SLURM_CPUS_ON_NODE:-$(nproc)}
: "${OMP_NUM_THREADS:=$(( CPUS_ON_NODE / TASKS_PER_NODE > 0 ? CPUS_ON_NODE / TASKS_PER_NODE : 1 ))}"
export CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_AVOID_RECORD_STREAMS \
  NCCL_IB_TIMEOUT NCCL_NVLS_ENABLE NCCL_DEBUG PYTHONUNBUFFERED OMP_NUM_THREADS
# launch/train.py and slurm/node_check.sh import mm1_megatron from the repo (also in a container).
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

: "${PYTHON:=python}"
: "${MM1_MIN_FREE_GB:=100}"
: "${MM1_SKIP_NODE_CHECK:=0}"

# pyxis: the same named container for the health check and training (unpacked once per node).
CONTAINER=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then
  : "${CONTAINER_MOUNTS:=$REPO:$REPO}"
  CONTAINER=(--container-image="$CONTAINER_IMAGE"
             --container-mounts="$CONTAINER_MOUNTS,$RUN_DIR:$RUN_DIR"
             --container-workdir="${SLURM_SUBMIT_DIR:-$PWD}"
             --container-name="mm1-${SLURM_JOB_ID:-job}")
fi
read -r -a SRUN_EXTRA <<< "${SRUN_EXTRA_ARGS:-}"

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
