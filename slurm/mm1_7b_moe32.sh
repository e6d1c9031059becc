#!/usr/bin/env bash
# MM1 7B-MoE: 32 experts on every 4th layer (47B total); 16 nodes x 8 H100 80GB.
# Layout (tp/pp/ep, micro-batch, recompute, fp8): preset mm1-7b-moe32, mm1_megatron/config/presets.py.
#   sbatch slurm/mm1_7b_moe32.sh [key.sub=value ...]   # options: slurm/common.sh
#   bash slurm/mm1_7b_moe32.sh --dry-run    # plan + srun command, anywhere
# --time is a per-site choice; --signal=USR1@600 (to the job steps, i.e. the trainer) asks for a
# checkpoint 10 minutes before the limit, after which the job requeues itself.
#SBATCH --job-name=mm1-7b-moe32
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err

PRESET=mm1-7b-moe32
# sbatch runs a spooled copy of this file: find slurm/ through Slurm's record of the original.
here=$(dirname "$0")
[ -f "$here/common.sh" ] ||
  here=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")
source "$here/common.sh"
