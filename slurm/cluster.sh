#!/usr/bin/env bash
# A single-node SLURM (slurmctld + slurmd, authenticated by its own munged) on this machine, for the
# tests and CI (tests/e2e/test_slurm.py) and for trying slurm/train.sbatch without a cluster.
#
#   slurm/cluster.sh start    # installs munge + slurm-wlm (apt) if missing, starts what is not running,
#                             # waits until sinfo shows the node idle, prints `export SLURM_CONF=...`
#   slurm/cluster.sh stop     # stops only the daemons this script started (their pid files)
#   slurm/cluster.sh status   # sinfo, or exit 1 if the cluster is not up
#   eval "$(slurm/cluster.sh env)"   # SLURM_CONF for sbatch/srun/squeue/scontrol in this shell
#
# Idempotent: `start` on a running cluster only checks it. Everything (slurm.conf, the munge key and
# socket, state, spool, logs, pid files) lives in $SDA_SLURM_DIR (default /var/tmp/sda-jax-slurm), so
# nothing in /etc is written and a system SLURM or munged, if any, is left alone. Needs root (apt,
# and slurmd runs the jobs' tasks as their users).
#
# Settings that differ from SLURM's defaults, for a container without cgroups and for short tests:
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none   no cgroup v1/v2 needed
#   CPUs=$SDA_SLURM_CPUS (default 4) with SlurmdParameters=config_overrides
#                                      lets a 4-task test run on a 2-core machine (tasks share cores)
#   AuthInfo=cred_expire=$SDA_SLURM_CRED_EXPIRE (default 10)
#                                      SLURM holds a requeued job this long before starting it again
#                                      (default 120 s on a real cluster)
#   KillWait=30 (SLURM's default)      seconds between SIGTERM and SIGKILL on requeue/preemption/scancel
set -euo pipefail

STATE=${SDA_SLURM_DIR:-/var/tmp/sda-jax-slurm}
CONF=$STATE/slurm.conf
CPUS=${SDA_SLURM_CPUS:-4}
CRED_EXPIRE=${SDA_SLURM_CRED_EXPIRE:-10}
CTLD_PORT=${SDA_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${SDA_SLURM_SLURMD_PORT:-6818}
SOCKET=$STATE/munge/munge.socket
export SLURM_CONF=$CONF

log() { echo "slurm/cluster.sh: $*" >&2; }

alive() {  # alive PIDFILE: the process named in it runs
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  local missing=()
  command -v munged >/dev/null || [[ -x /usr/sbin/munged ]] || missing+=(munge)
  [[ -x /usr/sbin/slurmctld ]] || missing+=(slurmctld)
  [[ -x /usr/sbin/slurmd ]] || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  if ((${#missing[@]})); then
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >"$STATE/apt.log" 2>&1 || {
      apt-get update -q >>"$STATE/apt.log" 2>&1
      apt-get install -y -q "${missing[@]}" >>"$STATE/apt.log" 2>&1 || { log "apt-get failed, see $STATE/apt.log"; exit 1; }
    }
  fi
}

write_conf() {
  mkdir -p "$STATE"/{ctld,spool,log,munge}
  chmod 700 "$STATE/munge"
  local plugins
  plugins=$(dirname "$(find /usr/lib /usr/lib64 -name 'select_cons_tres.so' -print -quit 2>/dev/null)")
  cat >"$CONF.new" <<EOF
# Written by slurm/cluster.sh: a single-node SLURM for tests.
ClusterName=sda-jax
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=$CRED_EXPIRE
PluginDir=$plugins
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=300
SchedulerParameters=sched_interval=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv "$CONF.new" "$CONF"
}

start_munge() {
  if alive "$STATE/munged.pid"; then return; fi
  if [[ ! -s $STATE/munge/munge.key ]]; then
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1 count=1024 status=none
    chmod 400 "$STATE/munge/munge.key"
  fi
  /usr/sbin/munged --force --socket="$SOCKET" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
  for _ in $(seq 50); do alive "$STATE/munged.pid" && [[ -S $SOCKET ]] && return; sleep 0.1; done
  log "munged did not start, see $STATE/log/munged.log"; exit 1
}

node_idle() { [[ $(sinfo -h -n localhost -o %t 2>/dev/null) =~ ^(idle|mix|alloc) ]]; }

start() {
  [[ $(id -u) == 0 ]] || { log "start needs root"; exit 1; }
  mkdir -p "$STATE"
  install_packages
  [[ -f $CONF ]] && alive "$STATE/slurmctld.pid" || write_conf
  start_munge
  alive "$STATE/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF"
  alive "$STATE/slurmd.pid" || /usr/sbin/slurmd -f "$CONF" -N localhost
  for _ in $(seq 120); do
    if node_idle; then
      echo "export SLURM_CONF=$CONF"
      return
    fi
    state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
    if [[ $state =~ ^(down|drain) ]]; then  # e.g. left down by an earlier slurmd that was stopped
      scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    fi
    sleep 0.5
  done
  log "the node is not idle after 60 s: $(sinfo -h -n localhost -o '%t %E' 2>&1); logs in $STATE/log"
  exit 1
}

stop() {
  for daemon in slurmd slurmctld munged; do  # in this order: slurmd still talks to slurmctld on its way out
    pidfile=$STATE/$daemon.pid
    if alive "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      log "stopped $daemon ($pid)"
    fi
    rm -f "$pidfile"
  done
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) [[ -f $CONF ]] && timeout 20 sinfo ;;  # sinfo would wait 60 s for a missing slurm.conf
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
