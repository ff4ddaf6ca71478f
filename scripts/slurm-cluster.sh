#!/usr/bin/env bash
# scripts/slurm-cluster.sh -- a real, single-node SLURM cluster on localhost for tests.
#
# The project's launcher tests (pytest -m slurm) submit through submitit /
# hydra-submitit-launcher to a real slurmctld + slurmd, with slurmdbd + MariaDB
# for accounting (submitit learns job states only from `sacct`: without
# accounting a cancelled or killed job makes `job.result()` hang forever).
#
# Usage (as root, or via sudo; Debian 12 / Slurm 22.05, no systemd needed):
#
#   scripts/slurm-cluster.sh install   # apt-get install munge, slurm*, mariadb (idempotent)
#   scripts/slurm-cluster.sh start     # write config, start the daemons, wait until ready
#   eval "$(scripts/slurm-cluster.sh env)"   # only needed if SLURM_CONF is not /etc/slurm
#   pytest -m slurm                    # MQ_REQUIRE_SLURM=1 makes "cluster down" a failure
#   scripts/slurm-cluster.sh status    # which daemons are up; sinfo
#   scripts/slurm-cluster.sh stop      # cancel all jobs, stop the daemons we started
#   scripts/slurm-cluster.sh wipe      # (stopped) delete the state dir: job ids restart at 1
#
# CI from a clean machine: install && start && MQ_REQUIRE_SLURM=1 pytest -m slurm; stop.
#
# Everything lives under one state directory, $MQ_SLURM_DIR (default /tmp/mq-slurm):
#   etc/   slurm.conf gres.conf slurmdbd.conf    log/  logs of each daemon
#   pids/  PIDs of the daemons this script started (stop kills only these)
#   state/ slurmctld StateSaveLocation, slurmd spool    mysql/ MariaDB datadir + socket
#   dev/   fake GPU device nodes (char 1,3 = /dev/null), so gres gpu:2 can be scheduled
# The generated slurm.conf (+ gres.conf) is also copied to /etc/slurm/, marked as
# managed by this script, so sbatch/sacct/scancel need no SLURM_CONF. An existing
# /etc/slurm/slurm.conf without that marker is left alone; then `env` prints the
# SLURM_CONF export to use (also when MQ_SLURM_NO_ETC=1 is set).
# Cluster: name "mq", partition "debug" (default, no time limit), one node = this
# host (`hostname -s`, address 127.0.0.1), all its CPUs, DefMemPerCPU=1024, 2 fake GPUs.
# Slurm state (job ids, accounting) is kept across stop/start; `wipe` resets it.
# munged uses the system key/socket (/etc/munge/munge.key, /run/munge); a munged that
# is already running (e.g. under systemd) is reused and never stopped by this script.
# MariaDB runs socket-only (skip-networking) on $MQ_SLURM_DIR/mysql/mysqld.sock.
# Ports 6817-6819 (slurmctld, slurmd, slurmdbd) are fixed: one cluster per machine.
# `start` waits up to $MQ_SLURM_TIMEOUT s (default 60) per stage; on failure it prints
# the tail of the relevant log (log/NAME.log, log/NAME.out) and leaves the daemons it
# did start running for inspection: `stop`, or the next `start`, cleans them up.
# Typical times (2-core VM): start 3-5 s, stop 2 s, a requeued job restarts after ~11 s.
set -euo pipefail

STATE_DIR=${MQ_SLURM_DIR:-/tmp/mq-slurm}
CLUSTER=mq
PARTITION=debug
N_FAKE_GPUS=2
READY_TIMEOUT=${MQ_SLURM_TIMEOUT:-60}
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)
DAEMONS=(munged mysqld slurmdbd slurmctld slurmd) # start order; stop is reversed
MARKER="# managed by mq scripts/slurm-cluster.sh"

ETC=$STATE_DIR/etc
LOG=$STATE_DIR/log
PIDS=$STATE_DIR/pids
CONF=$ETC/slurm.conf
MYSQL_DIR=$STATE_DIR/mysql
MYSQL_SOCK=$MYSQL_DIR/mysqld.sock
SYS_CONF=/etc/slurm/slurm.conf

log() { echo "[slurm-cluster] $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null; then
            exec sudo MQ_SLURM_DIR="$STATE_DIR" MQ_SLURM_TIMEOUT="$READY_TIMEOUT" \
                MQ_SLURM_NO_ETC="${MQ_SLURM_NO_ETC:-}" "$0" "$@"
        fi
        die "must run as root (or with sudo available)"
    fi
}

# Slurm commands inside this script always use our config explicitly.
sl() { SLURM_CONF=$CONF "$@"; }

# ---------------------------------------------------------------- processes ----
comm_of() { # expected /proc/PID/comm of each daemon (guards against PID reuse)
    case $1 in
    mysqld) echo mariadbd ;;
    *) echo "$1" ;;
    esac
}

alive() { # PID exists and is not a zombie (not yet reaped by pid 1)
    local st
    st=$(grep -m1 '^State:' "/proc/$1/status" 2>/dev/null) || return 1
    [[ ! $st =~ ^State:[[:space:]]+[ZX] ]]
}

pid_of() { # recorded PID if that process is alive and is the right daemon
    local f=$PIDS/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$(comm_of "$1")" ]] || return 1
    echo "$pid"
}

is_external() { [[ -f $PIDS/$1.external ]]; }

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

up() { pid_of "$1" >/dev/null || { is_external "$1" && munge_ok; }; }

logfile() { echo "$LOG/$1.log"; }

show_log() {
    local f files=("$LOG/$1.out") # slurm daemons (-D) copy their whole log there
    case $1 in
    munged) files+=(/var/log/munge/munged.log) ;;
    mysqld) files+=("$(logfile mysqld)") ;;
    esac
    for f in "${files[@]}"; do
        if [[ -s $f ]]; then
            log "---- tail of $f"
            tail -n 25 "$f" >&2 || true
        fi
    done
}

# launch NAME CMD...: start a foreground daemon in its own session; record its PID.
# Its stdout/stderr go to log/NAME.out (slurm daemons in -D mode repeat their log
# there; it also catches errors from before the log file is opened).
# (setsid execs without forking here, so $! is the daemon's own PID; checked below.)
launch() {
    local name=$1 pid
    shift
    setsid "$@" >"$LOG/$name.out" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDS/$name.pid"
    sleep 0.2
    if ! pid_of "$name" >/dev/null; then
        sleep 1
        pid_of "$name" >/dev/null || {
            show_log "$name"
            die "$name (pid $pid) exited right after start"
        }
    fi
    log "started $name (pid $pid)"
}

# wait_for NAME DESCRIPTION CMD...: poll CMD until it succeeds, or fail with NAME's log.
wait_for() {
    local name=$1 what=$2 deadline=$((SECONDS + READY_TIMEOUT))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ! up "$name"; then
            show_log "$name"
            die "$name died while waiting for: $what"
        fi
        if ((SECONDS >= deadline)); then
            show_log "$name"
            die "timed out after ${READY_TIMEOUT}s waiting for: $what"
        fi
        sleep 0.5
    done
}

# stop_group NAME...: SIGTERM the recorded PIDs together, wait (30 s, then SIGKILL).
stop_group() {
    local name pid i any_alive
    local -A pids=()
    for name in "$@"; do
        if is_external "$name"; then
            rm -f "$PIDS/$name.external"
            log "$name was not started by this script; left running"
        elif pid=$(pid_of "$name"); then
            pids[$name]=$pid
            kill -TERM "$pid" 2>/dev/null || true
        else
            rm -f "$PIDS/$name.pid"
        fi
    done
    for ((i = 0; i < 200; i++)); do # 40 s; SIGKILL after 30 s
        any_alive=0
        for name in "${!pids[@]}"; do
            alive "${pids[$name]}" && any_alive=1
        done
        ((any_alive)) || break
        if ((i == 150)); then
            for name in "${!pids[@]}"; do
                alive "${pids[$name]}" || continue
                log "$name (pid ${pids[$name]}) ignored SIGTERM for 30 s; sending SIGKILL"
                kill -KILL "${pids[$name]}" 2>/dev/null || true
            done
        fi
        sleep 0.1
    done
    for name in "${!pids[@]}"; do
        if alive "${pids[$name]}"; then
            log "WARNING: $name (pid ${pids[$name]}) is still alive"
        else
            rm -f "$PIDS/$name.pid"
            log "stopped $name (pid ${pids[$name]})"
        fi
    done
}

# ------------------------------------------------------------------ install ----
cmd_install() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "all packages already installed: ${PACKAGES[*]}"
        return
    fi
    need_root install
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # no daemons get started by the packages' maintainer scripts on systemd-less
    # machines; where they are, `start` reuses munged and uses its own mariadb/slurm.
    apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}" >/dev/null
    log "installed: ${missing[*]}"
}

# ------------------------------------------------------------------- config ----
ensure_hostname() {
    HOST=$(hostname -s)
    if ! getent hosts "$HOST" >/dev/null; then
        log "hostname $HOST does not resolve; adding it to /etc/hosts as 127.0.0.1"
        echo "127.0.0.1 $HOST" >>/etc/hosts
    fi
}

write_config() {
    local node_line i gpus
    # NodeName line as slurmd sees the hardware, e.g.
    # NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
    node_line=$(slurmd -C | head -n 1)
    [[ $node_line == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
    node_line="NodeName=$HOST ${node_line#* }"
    log "node: $node_line"

    mkdir -p "$STATE_DIR/dev"
    gpus=""
    for ((i = 0; i < N_FAKE_GPUS; i++)); do
        [[ -c $STATE_DIR/dev/mq-fakegpu$i ]] || {
            rm -f "$STATE_DIR/dev/mq-fakegpu$i"
            mknod -m 666 "$STATE_DIR/dev/mq-fakegpu$i" c 1 3
        }
        gpus+="Name=gpu File=$STATE_DIR/dev/mq-fakegpu$i"$'\n'
    done

    cat >"$CONF.new" <<EOF
$MARKER (state dir $STATE_DIR); regenerated on every start
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# short credential lifetime: a requeued job restarts in ~10 s instead of ~150 s
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/state/slurmctld
SlurmdSpoolDir=$STATE_DIR/state/slurmd
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, a job that gives no --mem gets the whole node's memory
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
GresTypes=gpu
$node_line Gres=gpu:$N_FAKE_GPUS NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    printf '%s\n%s' "$MARKER (state dir $STATE_DIR)" "$gpus" >"$ETC/gres.conf"
    mv "$CONF.new" "$CONF"

    cat >"$ETC/slurmdbd.conf" <<EOF
$MARKER (state dir $STATE_DIR)
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$STATE_DIR/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
# "localhost" = MariaDB's unix socket (MYSQL_UNIX_PORT); root via unix_socket auth
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chown root:root "$ETC/slurmdbd.conf"
    chmod 600 "$ETC/slurmdbd.conf"

    # make plain sbatch/sacct/scancel find this cluster without SLURM_CONF
    if [[ -z ${MQ_SLURM_NO_ETC:-} ]]; then
        if [[ ! -e $SYS_CONF ]] || grep -qF "$MARKER" "$SYS_CONF"; then
            mkdir -p /etc/slurm
            cp "$CONF" "$SYS_CONF.mq-new" && mv "$SYS_CONF.mq-new" "$SYS_CONF"
            cp "$ETC/gres.conf" /etc/slurm/gres.conf.mq-new &&
                mv /etc/slurm/gres.conf.mq-new /etc/slurm/gres.conf
        else
            log "NOTE: $SYS_CONF exists and is not ours; left alone."
            log "      Use: eval \"\$($0 env)\"  (exports SLURM_CONF=$CONF)"
        fi
    fi
}

# -------------------------------------------------------------------- start ----
start_munged() {
    if munge_ok; then
        if ! pid_of munged >/dev/null; then
            log "munged already running (not started by this script): reusing it"
            touch "$PIDS/munged.external"
        fi
        return
    fi
    rm -f "$PIDS/munged.external"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating munge key /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    # -f: tolerate a stale socket left by a killed munged
    launch munged setpriv --reuid=munge --regid=munge --init-groups munged -F -f
    wait_for munged "munge credentials" munge_ok
}

mysql_ok() { mariadb-admin --no-defaults --socket="$MYSQL_SOCK" -uroot ping; }

start_mysqld() {
    mkdir -p "$MYSQL_DIR"
    if [[ ! -d $MYSQL_DIR/data/mysql ]]; then
        log "initialising MariaDB datadir $MYSQL_DIR/data"
        rm -rf "$MYSQL_DIR/data"
        mariadb-install-db --no-defaults --user=root --datadir="$MYSQL_DIR/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            >>"$(logfile mysqld)" 2>&1 || {
            show_log mysqld
            die "mariadb-install-db failed"
        }
    fi
    # (slurmdbd still logs "not recommended values: innodb_buffer_pool_size": it wants
    # GiBs for production; harmless here, so the pool stays small)
    # runs as root (it is socket-only and test-only) so that any state dir works,
    # e.g. one below a 0700 home directory that the mysql user could not enter
    launch mysqld mariadbd --no-defaults --user=root --datadir="$MYSQL_DIR/data" \
        --socket="$MYSQL_SOCK" --skip-networking --pid-file="$STATE_DIR/run/mysqld.pid" \
        --log-error="$(logfile mysqld)" --skip-log-bin \
        --innodb-buffer-pool-size=128M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900
    wait_for mysqld "MariaDB on $MYSQL_SOCK" mysql_ok
}

ctld_ok() { sl scontrol ping | grep -q UP; }
dbd_ok() { sl sacctmgr -n -P list cluster format=cluster; }

node_state() { sl sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n 1; }

node_ready() {
    local st
    st=$(node_state)
    [[ $st == idle || $st == mixed || $st == allocated ]] || return 1
    sl sacct -n -X -S now-1hour -o JobID >/dev/null
}

start_slurm() {
    mkdir -p "$STATE_DIR/state/slurmctld" "$STATE_DIR/state/slurmd"
    # slurmdbd: reads slurmdbd.conf next to $SLURM_CONF; MYSQL_UNIX_PORT = our socket
    launch slurmdbd env SLURM_CONF="$CONF" MYSQL_UNIX_PORT="$MYSQL_SOCK" slurmdbd -D
    wait_for slurmdbd "slurmdbd answering sacctmgr" dbd_ok
    if ! dbd_ok | grep -qx "$CLUSTER"; then
        sl sacctmgr -i add cluster "$CLUSTER" >/dev/null
        log "registered cluster '$CLUSTER' in the accounting database"
    fi

    launch slurmctld env SLURM_CONF="$CONF" slurmctld -D -f "$CONF"
    wait_for slurmctld "slurmctld answering scontrol ping" ctld_ok

    launch slurmd env SLURM_CONF="$CONF" slurmd -D -f "$CONF"
    local deadline=$((SECONDS + READY_TIMEOUT)) st
    until node_ready 2>/dev/null; do
        st=$(node_state)
        # a node left down/drained by an earlier run (e.g. killed slurmd) -> resume it
        if [[ $st == down* || $st == drain* ]]; then
            sl scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        fi
        for d in slurmdbd slurmctld slurmd; do
            up "$d" || {
                show_log "$d"
                die "$d died while waiting for the node"
            }
        done
        if ((SECONDS >= deadline)); then
            sl sinfo -N >&2 || true
            show_log slurmd
            show_log slurmctld
            die "timed out after ${READY_TIMEOUT}s waiting for node $HOST to be idle (state: ${st:-?}) and sacct to answer"
        fi
        sleep 0.5
    done
}

cmd_start() {
    local d any=0 all=1 t0=$SECONDS
    for d in "${DAEMONS[@]}"; do
        if up "$d"; then any=1; else all=0; fi
    done
    if ((all)); then
        log "already running (state dir $STATE_DIR)"
        return 0
    fi
    need_root start
    if ((any)); then
        log "partially running; stopping the rest first"
        do_stop
    fi
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            die "package $p is missing: run '$0 install' first"
    done
    mkdir -p "$ETC" "$LOG" "$PIDS" "$STATE_DIR/run"
    chmod 755 "$STATE_DIR"
    ensure_hostname
    write_config
    start_munged
    start_mysqld
    start_slurm
    log "cluster '$CLUSTER' ready in $((SECONDS - t0)) s: partition $PARTITION, node $HOST"
    sl sinfo >&2
    if [[ -n ${MQ_SLURM_NO_ETC:-} ]] || ! grep -qF "$MARKER (state dir $STATE_DIR)" "$SYS_CONF" 2>/dev/null; then
        log "NOTE: clients need: export SLURM_CONF=$CONF"
    fi
}

# --------------------------------------------------------------------- stop ----
cancel_all_jobs() {
    up slurmctld || return 0
    local ids i
    ids=$(sl squeue -h -o %A 2>/dev/null | tr '\n' ' ') || return 0
    [[ -n ${ids// /} ]] || return 0
    log "cancelling jobs: $ids"
    # shellcheck disable=SC2086
    sl scancel $ids 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do # up to 20 s (KillWait=5)
        [[ -z $(sl squeue -h -t running,completing -o %A 2>/dev/null) ]] && break
        sleep 0.5
    done
}

do_stop() {
    cancel_all_jobs
    # reverse start order; daemons in one group shut down concurrently
    stop_group slurmd slurmctld
    stop_group slurmdbd
    stop_group mysqld munged
}

cmd_stop() {
    local d any=0
    for d in "${DAEMONS[@]}"; do
        [[ -e $PIDS/$d.pid || -e $PIDS/$d.external ]] && any=1
    done
    if ((!any)); then
        log "not running (no PID files in $PIDS)"
        return 0
    fi
    need_root stop
    do_stop
    log "stopped"
}

# ------------------------------------------------------------ status / env ----
cmd_status() {
    local d pid rc=0
    echo "state dir: $STATE_DIR"
    for d in "${DAEMONS[@]}"; do
        if pid=$(pid_of "$d"); then
            printf '  %-10s up (pid %s)\n' "$d" "$pid"
        elif up "$d"; then
            printf '  %-10s up (not started by this script)\n' "$d"
        else
            printf '  %-10s DOWN\n' "$d"
            rc=1
        fi
    done
    if ((rc == 0)); then
        sl sinfo 2>&1 | sed 's/^/  /' || true
    fi
    return $rc
}

cmd_env() {
    if [[ -n ${MQ_SLURM_NO_ETC:-} ]] || ! grep -qF "$MARKER (state dir $STATE_DIR)" "$SYS_CONF" 2>/dev/null; then
        echo "export SLURM_CONF=$CONF"
    else
        echo "# $SYS_CONF is this cluster's config (state dir $STATE_DIR); nothing to export"
    fi
}

cmd_wipe() {
    local d
    for d in "${DAEMONS[@]}"; do
        pid_of "$d" >/dev/null && die "$d is running: run '$0 stop' first"
    done
    need_root wipe
    [[ -d $STATE_DIR ]] || return 0
    [[ -d $ETC || -d $PIDS ]] || die "$STATE_DIR does not look like a state dir; not deleting"
    rm -rf "$STATE_DIR"
    log "removed $STATE_DIR"
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) cmd_env ;;
wipe) cmd_wipe ;;
*)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    echo "usage: $0 {install|start|stop|status|env|wipe}" >&2
    exit 2
    ;;
esac
