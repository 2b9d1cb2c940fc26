#!/usr/bin/env bash
# Stop the daemons that tests/slurm/start_local_slurm.sh started, by the pids it recorded:
# slurmd, slurmctld, then munged. A pid that no longer runs the expected program is left alone.
set -euo pipefail

STATE=${PNP_SLURM_DIR:-/tmp/pnp-detr-slurm}

stop() {  # stop NAME: end the process whose pid NAME.pid holds, if it still runs NAME
  local pidfile=$STATE/$1.pid pid
  [[ -s $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1" ]]; then
    kill "$pid"
    for _ in $(seq 50); do
      [[ -e /proc/$pid ]] || break
      sleep 0.2
    done
    if [[ -e /proc/$pid ]]; then
      kill -9 "$pid"
    fi
    echo "stopped $1 ($pid)"
  fi
  rm -f "$pidfile"
}

stop slurmd
stop slurmctld
stop munged
