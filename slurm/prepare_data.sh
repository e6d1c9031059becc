#!/usr/bin/env bash
# Prepare a dataset on Slurm: mm1-prepare-data submits the indexing tasks as one array job and
# the merge as a job depending on it, then returns (run from a login node, not with sbatch).
#   bash slurm/prepare_data.sh SOURCE OUT [more mm1-prepare-data options]
# e.g. DataComp-1B's ~140k img2dataset tars in 2000 tasks of ~70 tars, 4 tasks per array
# element (fewer, longer jobs for the scheduler):
#   PARTITION=cpu TASKS=2000 TOKENIZER=tok.model bash slurm/prepare_data.sh /data/datacomp \
#       /data/prepared/datacomp
# A task that fails (node lost, time limit) leaves the others' work: run the same line again
# to submit only the unfinished tasks and the merge. The merge job's log
# (OUT/logs/merge-JOBID.out) ends with the JSON summary line. Options: KIND (caption),
# TASKS (100), TASKS_PER_JOB (1), TIME (04:00:00), CPUS_PER_TASK (1), MEM_PER_CPU_GB (2),
# TOKENIZER (none: no token index), PARTITION (required).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash slurm/prepare_data.sh SOURCE OUT [mm1-prepare-data options]" >&2
  exit 2
fi
source_path=$1 out=$2
shift 2
: "${PARTITION:?set PARTITION to the Slurm partition the tasks run in}"
exec "${PYTHON:-python}" -m mm1_megatron.data.prepare "$source_path" --kind "${KIND:-caption}" \
  --output "$out" --no-progress --tasks "${TASKS:-100}" --slurm --partition "$PARTITION" \
  --time "${TIME:-04:00:00}" --cpus-per-task "${CPUS_PER_TASK:-1}" \
  --mem-per-cpu-gb "${MEM_PER_CPU_GB:-2}" --tasks-per-job "${TASKS_PER_JOB:-1}" \
  ${TOKENIZER:+--tokenizer "$TOKENIZER"} "$@"
