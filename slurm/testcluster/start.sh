#!/bin/bash
# Start a throw-away Slurm cluster on loopback for tests: munged, MariaDB + slurmdbd (real accounting,
# so `sacct` works), slurmctld and two slurmd ("$(hostname -s)" and "localhost": two nodes whose names
# resolve, on one machine). Written for Debian 12's Slurm 22.05; needs root and the packages
#     slurmctld slurmd slurm-client munge slurmdbd mariadb-server
# See README.md next to this file.
#
#   start.sh               start, wait until every node is idle, return (the cluster keeps running)
#   start.sh --foreground  same, but stay in the foreground as the daemons' parent until they exit
#                          (tests/slurm_cluster.py uses this: the daemons get reaped, no zombies)
#   start.sh --foreground --stop-on-eof
#                          and stop the cluster when stdin reaches end of file: give it a pipe and
#                          the cluster goes away with the process holding the other end, even after
#                          a SIGKILL (tests/slurm_cluster.py does)
# Afterwards:  source "$SLURM_TEST_DIR/env.sh"     and to stop:  stop.sh
#
# Environment knobs (all optional):
#   SLURM_TEST_DIR         config, state, logs, database   (default ${TMPDIR:-/tmp}/pml-dist-slurm)
#   SLURM_TEST_PORT        first of the ports used: slurmctld PORT, slurmd's PORT+1.., slurmdbd PORT+50,
#                          mariadbd PORT+60 (all on 127.0.0.1)                        (default 26817)
#   SLURM_TEST_NODE_NAMES  space-separated node names, one slurmd each; they must resolve to this
#                          machine                                    (default "$(hostname -s) localhost")
#   SLURM_TEST_CPUS        CPUs per node (every node gets the whole machine)
#                                                         (default getconf _NPROCESSORS_ONLN)
#   SLURM_TEST_GPUS        fake GPUs (gres gpu) per node; 0 = no gres                 (default 2)
#   SLURM_TEST_REQUEUE_DELAY  seconds before a requeued job may start again (cred_expire; Slurm's
#                          default 120, minimum 5)                                    (default 10)
#   SLURM_TEST_TIMEOUT     seconds each start-up stage may take                       (default 60)
#   SLURM_TEST_TOKEN       written to $SLURM_TEST_DIR/ready once the cluster is up    (default: own pid)
# Exit status: 0 up; 1 failed (daemon logs on stderr); 2 usage or missing programs;
#              75 busy: another cluster holds this directory, or a port is taken (try another
#              SLURM_TEST_DIR / SLURM_TEST_PORT).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
D=${SLURM_TEST_DIR:-${TMPDIR:-/tmp}/pml-dist-slurm}
PORT=${SLURM_TEST_PORT:-26817}
HOST=$(hostname -s)
NAMES=${SLURM_TEST_NODE_NAMES:-"$HOST localhost"}
# every CPU of the machine, as slurmd -C counts them: not nproc, which honours OMP_NUM_THREADS
# (OMP_NUM_THREADS=1 would give each node 1 CPU) and the caller's affinity mask
CPUS=${SLURM_TEST_CPUS:-$(getconf _NPROCESSORS_ONLN)}
GPUS=${SLURM_TEST_GPUS:-2}
REQUEUE_DELAY=${SLURM_TEST_REQUEUE_DELAY:-10}
TIMEOUT=${SLURM_TEST_TIMEOUT:-60}
MEM_MB=$(( $(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 * 8 / 10 ))   # 80% of RAM, per node
DBD_PORT=$((PORT + 50))
DB_PORT=$((PORT + 60))

FOREGROUND=0
STOP_ON_EOF=0
for arg in "$@"; do
    case "$arg" in
        --foreground) FOREGROUND=1 ;;
        --stop-on-eof) STOP_ON_EOF=1 ;;
        *) echo "usage: $0 [--foreground [--stop-on-eof]]" >&2; exit 2 ;;
    esac
done
[ "$STOP_ON_EOF" = 0 ] || [ "$FOREGROUND" = 1 ] || { echo "$0: --stop-on-eof needs --foreground" >&2; exit 2; }

missing=""
for p in munged mariadb-install-db mariadbd mariadb slurmdbd slurmctld slurmd sinfo scontrol sacctmgr \
         flock; do
    command -v "$p" >/dev/null 2>&1 || missing+=" $p"
done
if [ -n "$missing" ]; then
    echo "start.sh: missing programs:$missing (apt-get install slurmctld slurmd slurm-client munge" \
         "slurmdbd mariadb-server; the daemons are in /usr/sbin)" >&2
    exit 2
fi
[ "$(id -u)" = 0 ] || { echo "start.sh: needs root (the daemons and jobs run as root)" >&2; exit 2; }
# shellcheck disable=SC2086
if [ "$(printf '%s\n' $NAMES | sort | uniq -d)" != "" ]; then
    echo "start.sh: duplicate node names in '$NAMES'; set SLURM_TEST_NODE_NAMES" >&2; exit 2
fi

# ------------------------------------------------------------------ default mode: run the foreground
# mode detached (its own session) and return once it reports the cluster up.
if [ "$FOREGROUND" = 0 ]; then
    mkdir -p "$(dirname "$D")"
    out=$(mktemp "${TMPDIR:-/tmp}/pml-dist-slurm-start.XXXXXX")
    token="$$-$RANDOM$RANDOM"
    SLURM_TEST_TOKEN=$token setsid bash "${BASH_SOURCE[0]}" --foreground </dev/null >"$out" 2>&1 &
    sup=$!
    while :; do
        if [ "$(cat "$D/ready" 2>/dev/null)" = "$token" ]; then cat "$out"; rm -f "$out"; exit 0; fi
        if ! kill -0 "$sup" 2>/dev/null; then
            rc=0; wait "$sup" || rc=$?
            cat "$out" >&2; rm -f "$out"; exit "$rc"
        fi
        sleep 0.1
    done
fi

# ------------------------------------------------------------------ foreground mode
t0=$(date +%s.%N)
exec 8<&0 </dev/null   # keep the caller's stdin as fd 8 (--stop-on-eof); nothing else reads it
mkdir -p "$(dirname "$D")"
# The lock is held by this shell for the cluster's lifetime (the daemons do not inherit it), so a
# second start on the same directory is refused while this one runs ...
exec 9>"$D.lock"
if ! flock -n 9; then
    echo "start.sh: a test cluster is already running in $D (lock $D.lock is held); run stop.sh" \
         "first, or use another SLURM_TEST_DIR and SLURM_TEST_PORT" >&2
    exit 75
fi

alive() {   # alive PID: running and not a zombie (stat field 3)
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
alive_pidfile() {   # alive_pidfile DIR/run/NAME.pid: alive, and its command is NAME without "-node"
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && alive "$pid" || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid | sed 's/-.*//')" ]
}

# ... and daemons still alive without a lock holder are a stale cluster (its supervisor was killed).
stale=""
for f in "$D"/run/*.pid; do
    alive_pidfile "$f" && stale+=" $(basename "$f" .pid)"
done
if [ -n "$stale" ]; then
    echo "start.sh: stopping a stale cluster in $D:$stale"
    SLURM_TEST_DIR=$D bash "$HERE/stop.sh" || true
fi

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ports="$PORT $DBD_PORT $DB_PORT"
i=0
for _ in $NAMES; do i=$((i + 1)); ports+=" $((PORT + i))"; done
for p in $ports; do
    if port_busy "$p"; then
        echo "start.sh: port $p on 127.0.0.1 is in use; set SLURM_TEST_PORT (uses PORT..PORT+60)" >&2
        exit 75
    fi
done
for n in $NAMES; do
    getent hosts "$n" >/dev/null || echo "start.sh: warning: node name '$n' does not resolve" >&2
done

rm -rf "$D"
mkdir -p "$D"/{etc,state,log,run,spool,munge/key,munge/sock,db}
chmod 755 "$D" "$D/munge" "$D/munge/sock"   # munged wants every directory above its socket searchable
chmod 700 "$D/munge/key"
echo "$$" > "$D/supervisor.pid"
export SLURM_CONF=$D/etc/slurm.conf   # the daemons inherit it; slurmdbd finds slurmdbd.conf beside it

LAUNCHED=()
LAUNCHED_PIDS=()
launch() {   # launch NAME CMD...: run a daemon in the foreground as a child of this shell
    local name=$1
    shift
    "$@" </dev/null >"$D/log/$name.out" 2>&1 8<&- 9>&- &
    echo "$!" > "$D/run/$name.pid"
    LAUNCHED+=("$name")
    LAUNCHED_PIDS+=("$!")
}

fail() {
    echo "start.sh: $*" >&2
    for f in "$D"/log/*; do
        [ -s "$f" ] || continue
        echo "---- $f (last 15 lines)" >&2
        tail -n 15 "$f" >&2
    done
    SLURM_TEST_DIR=$D bash "$HERE/stop.sh" >&2 || true
    wait || true
    exit 1
}

check_launched() {   # fail fast when a daemon has exited
    local name
    for name in "${LAUNCHED[@]}"; do
        alive "$(cat "$D/run/$name.pid")" || fail "$name exited during start-up"
    done
}

wait_for() {   # wait_for WHAT CMD...: poll CMD every 0.1 s for at most TIMEOUT seconds
    local what=$1 deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        check_launched
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${TIMEOUT}s waiting for $what"
        sleep 0.1
    done
}

on_signal() {
    trap - TERM INT HUP
    echo "start.sh: signal received, stopping the cluster in $D" >&2
    SLURM_TEST_DIR=$D bash "$HERE/stop.sh" >&2 || true
    wait || true
    exit 143
}
trap on_signal TERM INT HUP

# ------------------------------------------------------------------ munge
dd if=/dev/urandom of="$D/munge/key/munge.key" bs=1024 count=1 status=none
chmod 400 "$D/munge/key/munge.key"
SOCK=$D/munge/sock/munge.socket
launch munged munged --foreground --key-file="$D/munge/key/munge.key" \
    --seed-file="$D/munge/key/munged.seed" --socket="$SOCK" --pid-file="$D/munge/munged.pid" \
    --log-file="$D/log/munged.log"
wait_for "munged" test -S "$SOCK"

# ------------------------------------------------------------------ MariaDB
# Small InnoDB files and no durability: 26 MB and 1 s to create instead of 114 MB and 2.3 s.
DB_OPTS=(--no-defaults --user=root --datadir="$D/db/data" --innodb-buffer-pool-size=64M
         --innodb-log-file-size=8M --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0
         --skip-name-resolve)
mariadb-install-db "${DB_OPTS[@]}" --skip-test-db --auth-root-authentication-method=normal \
    > "$D/log/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed"
# --skip-grant-tables: no passwords at all; acceptable for a loopback-only throw-away database
launch mariadbd mariadbd "${DB_OPTS[@]}" --socket="$D/db/mysqld.sock" --pid-file="$D/db/mariadbd.pid" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --skip-grant-tables --log-error="$D/log/mariadbd.log"
wait_for "mariadbd" mariadb --no-defaults --socket="$D/db/mysqld.sock" -e 'select 1'

# ------------------------------------------------------------------ slurm.conf, gres.conf, slurmdbd.conf
# The site: names tests may rely on (also written to $D/site for tests/slurm_cluster.py).
ACCOUNT=pml          # root's default account
OTHER_ACCOUNT=other  # exists, but root has no association with it: --account=other is refused
TIGHT_QOS=tight      # MaxSubmitJobsPerUser=2, MaxWall=5 min, DenyOnLimit (sbatch refuses, no job
                     # pending forever); root may use normal (the default) and tight
SHORT_MAX_MIN=10     # MaxTime of partition "short"
GRACE_S=5            # GraceTime of partition "low" (preemptible): SIGTERM, then SIGKILL this much later
NODE_LINES=""
GRES_LINES=""
i=0
for n in $NAMES; do
    i=$((i + 1))
    NODE_LINES+="NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$CPUS"
    NODE_LINES+=" RealMemory=$MEM_MB"
    if [ "$GPUS" -gt 0 ]; then
        # fake GPUs: symlinks to /dev/null, one directory per node (slurmd wants character or block
        # devices: with regular files it logs "is not a valid character or block device" and sets
        # no CUDA_VISIBLE_DEVICES)
        mkdir -p "$D/dev/$n"
        for g in $(seq 0 $((GPUS - 1))); do ln -s /dev/null "$D/dev/$n/nvidia$g"; done
        NODE_LINES+=" Gres=gpu:$GPUS"
        GRES_LINES+="NodeName=$n Name=gpu File=$D/dev/$n/nvidia[0-$((GPUS - 1))]"$'\n'
    fi
    NODE_LINES+=" State=UNKNOWN"$'\n'
done
GRES_CONF=""
[ "$GPUS" -gt 0 ] && GRES_CONF="GresTypes=gpu"$'\n'"AccountingStorageTRES=gres/gpu"
printf 'AutoDetect=off\n%s' "$GRES_LINES" > "$D/etc/gres.conf"
# Notes on the choices (README.md has more):
# - AuthInfo socket=: clients and daemons use our munged, not /run/munge; cred_expire: requeue delay.
# - AccountingStoragePass: the munge socket slurmctld/sacct use towards slurmdbd (without it they
#   try /run/munge/munge.socket.2 and slurmctld dies with "we have no TRES").
# - AccountingStorageEnforce: jobs need an association (account pml), QOS and limits are enforced;
#   EnforcePartLimits=ALL: a job above a partition's MaxTime is refused by sbatch, not left pending.
# - DependencyParameters=kill_invalid_depend: a job whose dependency can never be satisfied (afterok
#   on a failed job) is cancelled instead of pending forever with DependencyNeverSatisfied (Slurm's
#   default). Since 20.02 this is no longer read from SchedulerParameters.
# - MinJobAge=600: finished jobs stay visible to squeue/scontrol for 10 minutes.
# - MaxArraySize=5: small, so that the tests exercise splitting larger student arrays, yet large
#   enough for `sbatch --array=0-4 slurm/students.sbatch` (indices must be below MaxArraySize).
# - Preemption by partition PriorityTier, only of jobs in "low" (the others have PreemptMode=OFF)
#   and only by jobs in "urgent" (the only higher tier): ordinary jobs are never preempted.
cat > "$SLURM_CONF" <<EOF
ClusterName=testcluster
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=$REQUEUE_DELAY
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd-%n
SlurmctldPidFile=$D/state/slurmctld.pid
SlurmdPidFile=$D/state/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
$GRES_CONF
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
DependencyParameters=kill_invalid_depend
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$SOCK
AccountingStorageEnforce=associations,limits,qos
EnforcePartLimits=ALL
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
MaxArraySize=5
KillWait=5
Waittime=0
$NODE_LINES
PartitionName=cpu    Nodes=ALL Default=YES MaxTime=INFINITE PriorityTier=1 PreemptMode=OFF State=UP
PartitionName=gpu    Nodes=ALL MaxTime=INFINITE PriorityTier=1 PreemptMode=OFF State=UP
PartitionName=debug  Nodes=ALL MaxTime=INFINITE PriorityTier=1 PreemptMode=OFF State=UP
PartitionName=short  Nodes=ALL MaxTime=$SHORT_MAX_MIN PriorityTier=1 PreemptMode=OFF State=UP
PartitionName=low    Nodes=ALL MaxTime=INFINITE PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_S State=UP
PartitionName=urgent Nodes=ALL MaxTime=INFINITE PriorityTier=10 PreemptMode=OFF State=UP
EOF

cat > "$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
LogFile=$D/log/slurmdbd.log
PidFile=$D/state/slurmdbd.pid
EOF
chmod 600 "$D/etc/slurmdbd.conf"   # slurmdbd refuses a slurmdbd.conf that others can read

# ------------------------------------------------------------------ slurmdbd, accounts
launch slurmdbd slurmdbd -D
wait_for "slurmdbd on port $DBD_PORT" port_busy "$DBD_PORT"
# Before slurmctld starts, so that it loads the associations when it registers: no job can be
# submitted before they exist (with AccountingStorageEnforce=associations it would be refused).
# The QOS first (a load file cannot create one), then the cluster, accounts and user from one load
# file: one sacctmgr, one commit (1.2 s; separate `add` commands took 2.8 s).
cat > "$D/etc/accounts.cfg" <<EOF
Cluster - 'testcluster'
Parent - 'root'
Account - '$ACCOUNT':Description='pml-dist':Organization='pml':QOS='normal,$TIGHT_QOS':DefaultQOS='normal'
Account - '$OTHER_ACCOUNT':Description='not for root':Organization='other'
Parent - '$ACCOUNT'
User - 'root':DefaultAccount='$ACCOUNT'
EOF
sacctmgr -i >"$D/log/sacctmgr.log" 2>&1 <<EOF || fail "sacctmgr failed: $(cat "$D/log/sacctmgr.log")"
add qos $TIGHT_QOS MaxSubmitJobsPerUser=2 MaxWall=00:05:00 Flags=DenyOnLimit
load file=$D/etc/accounts.cfg
EOF

# ------------------------------------------------------------------ slurmctld, slurmd's
launch slurmctld slurmctld -D -f "$SLURM_CONF"
wait_for "slurmctld" scontrol ping
for n in $NAMES; do
    mkdir -p "$D/spool/slurmd-$n"
    launch "slurmd-$n" slurmd -D -f "$SLURM_CONF" -N "$n"
done
all_idle() { [ "$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null | sort -u)" = idle ]; }
wait_for "every node to be idle" all_idle

cat > "$D/site" <<EOF
partitions=cpu gpu debug short low urgent
default_partition=cpu
preemptible_partition=low
preemptor_partition=urgent
grace_time_s=$GRACE_S
short_partition=short
short_max_time_min=$SHORT_MAX_MIN
account=$ACCOUNT
other_account=$OTHER_ACCOUNT
qos=normal
tight_qos=$TIGHT_QOS
tight_max_submit_jobs=2
tight_max_wall_min=5
gpus_per_node=$GPUS
cpus_per_node=$CPUS
EOF
printf '%s\n' $NAMES > "$D/nodes"
cat > "$D/env.sh" <<EOF
# source this to use the test cluster
export SLURM_CONF=$SLURM_CONF
EOF
# shellcheck disable=SC2086
echo "slurm test cluster up in $(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "%.2f", a-b}')s:" \
     "nodes:" $NAMES "(${CPUS} CPUs each), slurmctld on 127.0.0.1:$PORT; source $D/env.sh"
echo "${SLURM_TEST_TOKEN:-$$}" > "$D/ready"

# Supervise: wait until every daemon has exited (stop.sh, or a signal to this shell), reaping them.
any_launched_alive() {
    local pid
    for pid in "${LAUNCHED_PIDS[@]}"; do alive "$pid" && return 0; done
    return 1
}
if [ "$STOP_ON_EOF" = 1 ]; then
    while any_launched_alive; do
        rc=0
        read -r -t 1 -u 8 _ || rc=$?
        if [ "$rc" -gt 0 ] && [ "$rc" -le 128 ]; then   # end of file (> 128: timeout)
            echo "start.sh: stdin closed, stopping the cluster in $D" >&2
            SLURM_TEST_DIR=$D bash "$HERE/stop.sh" >&2 || true
            break
        fi
    done
fi
wait || true
rm -f "$D/ready" "$D/supervisor.pid"
