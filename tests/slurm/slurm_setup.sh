#!/usr/bin/env bash
# A one-node Slurm (Debian's slurmctld/slurmd, 22.05 on bookworm) on localhost, for the tests of
# slurm/*.sh; no systemd, no munge. Adapted from ../shared/reference/slurm-ci/slurm_ci_setup.sh.
#
# usage: SLURM_CI_DIR=DIR [SLURMCTLD_PORT=6817 SLURMD_PORT=6818] bash slurm_setup.sh
#   installs the packages when slurmctld is missing (apt-get, needs root), writes DIR/slurm.conf,
#   starts both daemons (pid files DIR/slurmctld.pid, DIR/slurmd.pid) and waits until the node is
#   idle. Clients then need SLURM_CONF=DIR/slurm.conf. Stop the daemons by their pid files.
set -euo pipefail
D=${SLURM_CI_DIR:?set SLURM_CI_DIR}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
H=$(hostname -s)

if ! command -v slurmctld >/dev/null || ! command -v sbatch >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "slurm_setup: slurmctld is not installed and we are not root" >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client >/dev/null
fi

mkdir -p "$D/state" "$D/spool" "$D/log"
cat > "$D/slurm.conf" <<CONF
ClusterName=mm1ci
# Job ids unique across runs: logs/%x-%j.out of an earlier run's job 1 would be appended to.
FirstJobId=$(( $(date +%s) % 1000000 * 10 + 1000 ))
SlurmctldHost=$H(127.0.0.1)
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
# Schedule every second, not every 60 s (main loop) / 30 s (backfill): a requeued job starts
# as soon as its node is free instead of waiting for the next pass.
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=0
# `sbatch --wait` polls the job after 2, 8, then every 32 s while its interval is under half of
# MinJobAge (default 300): a 25 s job was noticed at 42 s. At 16 it polls every 8 s, and a
# finished job's record still outlives the poll long enough for the tests' `scontrol show job`.
MinJobAge=16
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=$H NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

export SLURM_CONF=$D/slurm.conf
/usr/sbin/slurmctld -f "$SLURM_CONF"   # daemonizes; pid -> $D/slurmctld.pid
/usr/sbin/slurmd -f "$SLURM_CONF"      # daemonizes; pid -> $D/slurmd.pid
for _ in $(seq 1 120); do
  if sinfo -h -o %T 2>/dev/null | grep -q -E '^idle'; then sinfo; exit 0; fi
  sleep 0.5
done
echo "slurm_setup: the node did not become idle in 60 s; logs in $D/log" >&2
sinfo >&2 || true
exit 1
