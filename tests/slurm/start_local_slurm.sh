#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (root, Debian), e.g. for the system tests:
#
#   bash tests/slurm/start_local_slurm.sh      # prints: export SLURM_CONF=/tmp/pnp-detr-slurm/slurm.conf
#   bash tests/slurm/stop_local_slurm.sh
#
# Installs slurm-wlm and munge from the distribution if they are missing, writes slurm.conf
# for this host (CPUs and memory as `slurmd -C` reads them) into a state folder, and starts
# munged, slurmctld and slurmd with their pid files there. Nothing under /etc is changed:
# clients find the cluster through SLURM_CONF. Run again while the cluster is up, it only
# prints the export line. PNP_SLURM_DIR overrides the state folder.
# Exit status 3: Slurm cannot be installed here (not root, or no working apt-get).
set -euo pipefail

STATE=${PNP_SLURM_DIR:-/tmp/pnp-detr-slurm}
CONF=$STATE/slurm.conf

cannot_install() { echo "error: $*" >&2; exit 3; }

running() {  # running NAME: NAME.pid in the state folder names a live process called NAME
  [[ -s $STATE/$1.pid ]] && [[ "$(cat "/proc/$(cat "$STATE/$1.pid")/comm" 2>/dev/null)" == "$1" ]]
}

[[ $(id -u) == 0 ]] || cannot_install "starting a local Slurm needs root (it installs packages and runs daemons)"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || cannot_install "slurm-wlm and munge are missing and there is no apt-get"
  echo "installing slurm-wlm and munge" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; } ||
    cannot_install "apt-get could not install slurm-wlm and munge"
fi

if running munged && running slurmctld && running slurmd; then
  echo "local Slurm already running (state in $STATE)" >&2
  echo "export SLURM_CONF=$CONF"
  exit 0
fi
bash "$(dirname "$0")/stop_local_slurm.sh" >&2  # whatever is left of an earlier start

mkdir -p "$STATE/munge" "$STATE/ctld" "$STATE/spool"
chown munge:munge "$STATE/munge"
chmod 711 "$STATE/munge"  # munged: nobody else may write here, but clients must reach the socket
[[ -s $STATE/munge/munge.key ]] || runuser -u munge -- mungekey --create --keyfile "$STATE/munge/munge.key"
runuser -u munge -- munged --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
  --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
cp "$STATE/munge/munged.pid" "$STATE/munged.pid"

host=$(hostname -s)
cat > "$CONF" <<EOF
# Written by tests/slurm/start_local_slurm.sh: one node, $host, on loopback.
ClusterName=pnpdetr
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again cred_expire + 1 seconds later (default 120, minimum 5).
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No cgroups: works in containers and VMs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
# Look at pending jobs every second (default 60), so that a requeued job starts promptly.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# submitit ignores SIGTERM (it checkpoints on SIGUSR2): kill 2 s after it (default 30).
KillWait=2
$(slurmd -C | head -n 1) NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF=$CONF
slurmctld -f "$CONF"
slurmd -f "$CONF"
for _ in $(seq 60); do
  if [[ "$(sinfo -h -N -o %t 2>/dev/null)" == idle ]]; then
    echo "started munged ($(cat "$STATE/munged.pid")), slurmctld ($(cat "$STATE/slurmctld.pid")) and" \
         "slurmd ($(cat "$STATE/slurmd.pid")); state in $STATE" >&2
    echo "export SLURM_CONF=$CONF"
    exit 0
  fi
  sleep 0.5
done
echo "error: the local Slurm did not come up within 30 s; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
exit 1
