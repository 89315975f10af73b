#!/usr/bin/env bash
# A real Slurm cluster on this one machine: munged + slurmctld + two slurmd "nodes" (node1, node2).
#   tools/slurm_local.sh start|stop|status
# Everything (slurm.conf, state, spool, pid and log files) lives under D2M_SLURM_DIR (default
# <repo>/.cache/slurm); `start` writes $D2M_SLURM_DIR/env (source it: exports SLURM_CONF) and is a
# no-op when the cluster is already up; `stop` kills exactly the daemons `start` launched, by PID.
# Needs root (apt-get install of slurm-wlm + munge when absent; the daemons run as root).
# Recipe: /work/shared/SLURM_LOCAL.md (Slurm 22.05 on Debian 12).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
DIR=${D2M_SLURM_DIR:-$repo/.cache/slurm}
CPUS=${D2M_SLURM_CPUS:-1}               # CPUs per node (the recipe's 1; one torchrun per node)
TIMEOUT=${D2M_SLURM_TIMEOUT:-60}        # seconds to wait for both nodes to be idle
export SLURM_CONF=$DIR/slurm.conf
die() { echo "slurm_local.sh: $*" >&2; exit 1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

nodes_idle() {
  local out
  out=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  [ "$(grep -cE '^node[12] idle$' <<<"$out")" = 2 ]
}

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "slurm-wlm/munge missing and not root: apt-get install -y slurm-wlm munge"
  echo "slurm_local.sh: installing slurm-wlm and munge" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  local host
  host=$(hostname -s)
  mkdir -p "$DIR/state" "$DIR/log"
  cat > "$SLURM_CONF" <<CONF
# written by tools/slurm_local.sh
ClusterName=d2mlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${D2M_SLURMCTLD_PORT:-6817}
AuthType=auth/munge
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=30
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmdSpoolDir=$DIR/spool.%n
SlurmdLogFile=$DIR/log/slurmd.%n.log
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4000 Port=${D2M_SLURMD_PORT1:-6818}
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4000 Port=${D2M_SLURMD_PORT2:-6819}
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
CONF
  echo "export SLURM_CONF=$SLURM_CONF" > "$DIR/env"
}

start() {
  if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.node1.pid" && alive "$DIR/slurmd.node2.pid" && nodes_idle_or_busy; then
    echo "slurm_local.sh: already up (source $DIR/env)"; return 0
  fi
  install
  mkdir -p "$DIR"
  write_conf
  # munge: reuse a running munged (someone else's: not ours to stop), else start one and own its pid file
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    # munged runs as the munge user (its key, seed and socket dirs are the munge user's)
    # its pid and log files live in /run/munge: the munge user may not be able to reach $DIR
    # (a checkout under a 0700 folder); root keeps a copy of the pid as proof that we started it
    mkdir -p /run/munge "$DIR/munge"
    chown munge:munge /run/munge
    local mlog=/run/munge/d2m-munged.log mpid=/run/munge/d2m-munged.pid
    runuser -u munge -- /usr/sbin/munged --pid-file="$mpid" --log-file="$mlog" \
      || die "munged failed to start (see $mlog)"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && [ -s "$mpid" ] && break; sleep 0.1; done
    munge -n | unmunge >/dev/null 2>&1 || die "munge -n | unmunge fails (see $mlog)"
    cp "$mpid" "$DIR/munge/munged.pid"
  fi
  alive "$DIR/slurmctld.pid" || slurmctld -f "$SLURM_CONF" -i
  for n in node1 node2; do
    alive "$DIR/slurmd.$n.pid" || slurmd -f "$SLURM_CONF" -N "$n"
  done
  local t0=$SECONDS
  until nodes_idle; do
    if [ $((SECONDS - t0)) -ge "$TIMEOUT" ]; then
      sinfo -N >&2 || true
      die "nodes node1,node2 not idle after ${TIMEOUT}s (logs in $DIR/log)"
    fi
    sleep 0.5
  done
  echo "slurm_local.sh: up in $((SECONDS - t0))s: source $DIR/env"
}

nodes_idle_or_busy() { sinfo -h -N -o '%N %t' 2>/dev/null | grep -qE '^node[12] (idle|alloc|mix|comp)'; }

stop() {
  local f pid
  for f in "$DIR"/slurmd.node1.pid "$DIR"/slurmd.node2.pid "$DIR"/slurmctld.pid "$DIR"/munge/munged.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && { echo "slurm_local.sh: $f ($pid) ignores TERM: KILL" >&2; kill -KILL "$pid"; }
    fi
    rm -f "$f"
  done
  echo "slurm_local.sh: stopped"
}

status() {
  local f rc=0
  for f in slurmctld slurmd.node1 slurmd.node2 munge/munged; do
    if alive "$DIR/$f.pid"; then echo "$f: running (pid $(cat "$DIR/$f.pid"))"
    else echo "$f: not running (by us)"; [ "$f" = munge/munged ] || rc=1; fi
  done
  [ $rc = 0 ] && sinfo -N
  return $rc
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: tools/slurm_local.sh start|stop|status" >&2; exit 2 ;;
esac
