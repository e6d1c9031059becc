# Sourced by slurm/common.sh (training) and slurm/eval.sh after they set REPO (and RUN_DIR, a
# folder to mount into the container, may be empty): the job's shape (NODES, TASKS_PER_NODE,
# GPUS_PER_NODE, WORLD_SIZE_PLANNED, IN_SLURM), the rendezvous, the NCCL / thread environment
# and the pyxis container options (CONTAINER, SRUN_EXTRA). Every default can be overridden by
# exporting the variable before sbatch.

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
             --container-mounts="$CONTAINER_MOUNTS${RUN_DIR:+,$RUN_DIR:$RUN_DIR}"
             --container-workdir="${SLURM_SUBMIT_DIR:-$PWD}"
             --container-name="mm1-${SLURM_JOB_ID:-job}")
fi
read -r -a SRUN_EXTRA <<< "${SRUN_EXTRA_ARGS:-}"
