#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try `hydra/launcher=slurm` without a cluster (Debian/Ubuntu, as root).
#   bash scripts/slurm_local.sh up     # install slurm-wlm + munge if missing, start munged, slurmctld and slurmd
#   export SLURM_CONF=...              # the line `up` prints: SLURM's commands (and submitit) then find the cluster
#   bash scripts/slurm_local.sh down   # cancel its jobs, stop exactly the daemons `up` started
# Everything lives in $SLURM_LOCAL_DIR (default /tmp/prunebench-slurm): slurm.conf, a private munge key and socket,
# pid files, logs and state, so no system file or daemon is touched. One partition, `debug`, holds the whole machine
# (no GPUs) and there is no accounting (sacct fails), as on some real clusters. Both commands are idempotent.
# Exit status: 0 done, 2 SLURM cannot be installed here (not root, no apt-get, or the install failed), 1 anything else.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/prunebench-slurm}
CONF=$DIR/slurm.conf
DAEMONS=(munged slurmctld slurmd)  # started in this order, stopped in the reverse one

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $1" >&2; exit "${2:-1}"; }  # die MESSAGE [STATUS]

running() {  # is the daemon whose pid file `up` wrote alive (and still that daemon, not a recycled pid)?
  local pid
  pid=$(cat "$DIR/$1.pid" 2>/dev/null) || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

alive() { [ -d "/proc/$1" ] && ! grep -q '^State:.*zombie' "/proc/$1/status" 2>/dev/null; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get to install them" 2
  say "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$DIR/install.log" 2>&1
  then
    tail -n 5 "$DIR/install.log" >&2
    die "installing slurm-wlm and munge failed (log: $DIR/install.log)" 2
  fi
}

write_config() {
  local node
  node=$(slurmd -C | head -n 1)  # this machine as slurmd sees it: "NodeName=<host> CPUs=... RealMemory=..."
  mkdir -p "$DIR/state" "$DIR/spool"
  cat >"$CONF" <<EOF
ClusterName=prunebench
SlurmctldHost=$(hostname -s)(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
SlurmUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=2
$node NodeAddr=127.0.0.1
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  [ "$(id -u)" = 0 ] || die "needs root (to install slurm-wlm and munge, and to run the daemons)" 2
  mkdir -p "$DIR" && chmod 700 "$DIR"
  install_packages
  export SLURM_CONF=$CONF
  if ! running munged; then
    [ -f "$DIR/munge.key" ] || (umask 077 && head -c 1024 /dev/urandom >"$DIR/munge.key")
    # --force: munged refuses a socket in a directory only root can enter; this cluster is root's alone
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
      --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed"
  fi
  if running slurmctld && running slurmd; then say "already up"; else write_config; fi
  running slurmctld || slurmctld -f "$CONF" || die "slurmctld did not start (log: $DIR/slurmctld.log)"
  running slurmd || slurmd -f "$CONF" || die "slurmd did not start (log: $DIR/slurmd.log)"
  local waited=0
  until [ "$(sinfo -h -N -o %t 2>/dev/null)" = idle ]; do
    [ "$((waited += 1))" -le 60 ] || die "the node is not idle after 30 s: $(sinfo -N 2>&1) (logs in $DIR)"
    sleep 0.5
  done
  say "up: one node, partition debug ($(sinfo -h -o '%c CPUs, %m MB')); to use it:"
  echo "export SLURM_CONF=$CONF"
}

down() {
  if running slurmctld; then  # jobs' slurmstepd processes outlive slurmd: cancel them and wait until they are gone
    export SLURM_CONF=$CONF
    scancel --partition=debug 2>/dev/null || true
    local waited=0
    while [ -n "$(squeue -h 2>/dev/null)" ]; do
      [ "$((waited += 1))" -le 60 ] || { say "jobs still there after 30 s, stopping the daemons anyway:"; squeue; break; }
      sleep 0.5
    done
  fi
  local daemon pid stopped=()
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    daemon=${DAEMONS[i]}
    running "$daemon" || continue
    pid=$(cat "$DIR/$daemon.pid")
    kill "$pid"
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid"
    stopped+=("$daemon")
  done
  rm -f "$DIR"/*.pid
  say "down: ${stopped[*]:-nothing was running}"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) die "usage: $0 up|down (state in SLURM_LOCAL_DIR=$DIR)" ;;
esac
