#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (munged + slurmctld + slurmd), for testing
# launch/slurm/pretrain.sbatch end to end (tests/train/test_slurm_cluster.py). Installs nothing: needs Debian's
# `slurm-wlm` and `munge` packages (apt-get install -y slurm-wlm munge) and root.
#
#   launch/slurm/local_cluster.sh start     # configure + start; waits until the node is idle (default command)
#   launch/slurm/local_cluster.sh status    # exit 0 when the cluster answers and the node is idle
#   launch/slurm/local_cluster.sh stop      # stop the daemons this script started (by their pid files)
#   export SLURM_CONF=/tmp/megatrain-slurm/slurm.conf   # then: sbatch / srun / squeue / scontrol use it
#
# Everything lives under $MEGATRAIN_SLURM_DIR (default /tmp/megatrain-slurm): slurm.conf, its own munge key and
# socket, state, logs and pid files. /etc/slurm, /etc/munge and any system munged/slurm daemons are left alone;
# clients find this cluster through SLURM_CONF. `start` is idempotent: a healthy cluster from an earlier start with
# the same slurm.conf is reused; a half-dead or differently configured one is stopped and started afresh (job state
# cleared). Jobs may be requeued (JobRequeue=1; launch/slurm/pretrain.sbatch requeues itself on preemption), and a
# requeued job may start again after cred_expire seconds (Slurm's default is 120: too slow for tests) at the next
# scheduling pass (every 2 s here, not 60).
# Settings (env): MEGATRAIN_SLURM_DIR, MEGATRAIN_SLURM_PORT (slurmctld port, default 16817; slurmd uses +1),
# MEGATRAIN_SLURM_TIMEOUT (seconds to wait for the idle node, default 60), MEGATRAIN_SLURM_CRED_EXPIRE (default 5).
set -euo pipefail

DIR=${MEGATRAIN_SLURM_DIR:-/tmp/megatrain-slurm}
PORT=${MEGATRAIN_SLURM_PORT:-16817}
TIMEOUT=${MEGATRAIN_SLURM_TIMEOUT:-60}
CRED_EXPIRE=${MEGATRAIN_SLURM_CRED_EXPIRE:-5}  # also the wait before a requeued job may start again (minimum 5)
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
export SLURM_CONF=$CONF

die() { echo "local_cluster: error: $*" >&2; exit 1; }
log() { echo "local_cluster: $*" >&2; }

running() {  # running PID: exists and is not a zombie (a killed daemon whose parent is gone may linger as one)
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

alive() { [[ -f $1 ]] && running "$(cat "$1")"; }

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n 1; }

healthy() {
    alive "$DIR/munge/munged.pid" && alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" \
        && [[ $(node_state) == idle ]]
}

stop_one() {  # stop_one NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local name=$1 pidfile=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if running "$pid"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
        if running "$pid"; then
            log "$name (pid $pid) ignored SIGTERM; killing it"
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

stop() {
    if [[ -f $CONF ]] && alive "$DIR/run/slurmctld.pid"; then
        scancel --quiet --full --state=RUNNING --partition=local 2>/dev/null || true
        scancel --quiet --state=PENDING --partition=local 2>/dev/null || true
    fi
    stop_one slurmd "$DIR/run/slurmd.pid"
    stop_one slurmctld "$DIR/run/slurmctld.pid"
    stop_one munged "$DIR/munge/munged.pid"
}

tail_logs() {
    local f
    for f in "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" "$DIR/munge/munged.log"; do
        [[ -f $f ]] && { echo "--- $f (last 15 lines)"; tail -n 15 "$f"; }
    done >&2
    return 0
}

start() {
    local missing=() cmd
    for cmd in munged slurmctld slurmd sinfo sbatch scontrol; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) || die "not installed: ${missing[*]} (apt-get install -y slurm-wlm munge)"
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd launches the job's tasks)"

    # The node as slurmd sees it; a node declared with more CPUs/memory than it has would be drained.
    local node cpus sockets cores threads mem hw
    node=$(hostname -s)
    hw=$(slurmd -C 2>/dev/null | head -n 1) || die "'slurmd -C' failed"
    field() { sed -n "s/.*\\b$1=\\([0-9]*\\).*/\\1/p" <<<"$hw"; }
    cpus=$(field CPUs); sockets=$(field SocketsPerBoard); cores=$(field CoresPerSocket)
    threads=$(field ThreadsPerCore); mem=$(field RealMemory)
    [[ -n $cpus && -n $mem ]] || die "could not parse 'slurmd -C': $hw"
    mem=$((mem * 95 / 100))  # leave slack: slurmd drains a node whose memory reads below the configured value

    local nodeline="NodeName=$node CPUs=$cpus SocketsPerBoard=${sockets:-1} CoresPerSocket=${cores:-$cpus}"
    nodeline+=" ThreadsPerCore=${threads:-1} RealMemory=$mem State=UNKNOWN"
    local conf
    conf=$(cat <<EOF
# Written by launch/slurm/local_cluster.sh: a one-node test cluster on $node.
ClusterName=megatrain-local
SlurmctldHost=$node
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=$CRED_EXPIRE
JobRequeue=1
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$nodeline
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
)

    if healthy && [[ -f $CONF && $(cat "$CONF") == "$conf" ]]; then
        log "already running (SLURM_CONF=$CONF)"
        echo "SLURM_CONF=$CONF"
        return 0
    fi
    stop  # whatever an earlier, now unhealthy or differently configured start left behind

    mkdir -p "$DIR"/{munge,state,spool,log,run}
    chmod 0755 "$DIR" "$DIR/munge"
    rm -f "$DIR"/log/*.log "$DIR/munge/munged.log"

    # Our own munge key and daemon (the system /etc/munge key and socket are not touched).
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$DIR/munge/munge.key"
    munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
        || { tail_logs; die "munged failed to start"; }
    munge -n -S "$SOCKET" | unmunge -S "$SOCKET" >/dev/null || { tail_logs; die "munge round trip failed"; }

    printf '%s\n' "$conf" >"$CONF"

    slurmctld -c -f "$CONF" || { tail_logs; die "slurmctld failed to start"; }
    slurmd -f "$CONF" || { tail_logs; die "slurmd failed to start"; }

    local deadline=$((SECONDS + TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state)
        [[ $state == idle ]] && break
        if [[ $state == down* || $state == drain* ]]; then
            scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
        fi
        sleep 1
    done
    if [[ $state != idle ]]; then
        tail_logs
        sinfo -N -l >&2 || true
        die "node $node not idle after ${TIMEOUT}s (state '${state:-no answer}'); logs in $DIR/log"
    fi
    log "up: node $node idle, $cpus CPUs, ${mem} MB (SLURM_CONF=$CONF)"
    echo "SLURM_CONF=$CONF"
}

case ${1:-start} in
    start) start ;;
    stop) stop; log "stopped" ;;
    status) healthy && { echo "SLURM_CONF=$CONF"; exit 0; }; echo "local_cluster: not running" >&2; exit 1 ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
