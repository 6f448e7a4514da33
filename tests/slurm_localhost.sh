#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine, for tests (run as root).
#
#   tests/slurm_localhost.sh start DIR   # prints "export SLURM_CONF=DIR/slurm.conf"
#   tests/slurm_localhost.sh stop DIR
#
# Everything lives in DIR (an empty directory, mode 700): slurm.conf, a munge key, munged's
# socket, slurmctld's state, slurmd's spool, pid files and logs. Nothing is written to /etc;
# clients find the cluster through SLURM_CONF. The controller and node ports are free ports
# picked at start, so the cluster does not collide with another one on the same machine.
# `start` waits until the node is idle (at most 20 s) and fails with the daemons' logs
# otherwise. Settings chosen for tests: KillWait=2 (SIGKILL 2 s after SIGTERM), a requeued
# job may start again after 5 s (cred_expire; default 120 s), no accounting (sacct fails).
set -euo pipefail

cmd=${1:?usage: $0 start|stop DIR}
dir=$(realpath -m "${2:?usage: $0 start|stop DIR}")

stop_daemons() {  # SIGTERM to each daemon named, then wait for all (SIGKILL after 5 s)
    local pids=() pidfile pid
    for pidfile in "$@"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$pidfile"
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
}

stop() {
    stop_daemons "$dir"/slurmd.pid "$dir"/slurmctld.pid
    stop_daemons "$dir"/munged.pid  # last: the SLURM daemons talk to it until they exit
}

if [ "$cmd" = stop ]; then
    stop
    exit 0
fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (slurmd runs jobs as their users)" >&2; exit 3; }
for bin in munged slurmctld slurmd sbatch squeue scontrol; do
    command -v "$bin" >/dev/null || { echo "missing $bin (apt-get install slurm-wlm munge)" >&2; exit 4; }
done

mkdir -p "$dir"
chmod 700 "$dir"
mkdir -p "$dir"/state "$dir"/spool "$dir"/log "$dir"/munge
chmod 700 "$dir"/munge

# munge: a key of our own, a socket in DIR
head -c 1024 /dev/urandom >"$dir"/munge/munge.key
chmod 400 "$dir"/munge/munge.key
munged --force --socket="$dir"/munge/munge.sock --key-file="$dir"/munge/munge.key \
    --pid-file="$dir"/munged.pid --log-file="$dir"/log/munged.log \
    --seed-file="$dir"/munge/munged.seed

read -r ctld_port node_port < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)

host=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cat >"$dir"/slurm.conf <<EOF
ClusterName=localtest
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$node_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=2
MinJobAge=300
JobRequeue=1
SchedulerParameters=sched_interval=2
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$dir"/slurm.conf

slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"

for _ in $(seq 200); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.1
done
echo "the node did not become idle within 20 s" >&2
sinfo >&2 || true
tail -n 20 "$dir"/log/*.log >&2 || true
stop
exit 5
