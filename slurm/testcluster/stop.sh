#!/bin/bash
# Stop the test cluster started by start.sh (same SLURM_TEST_DIR): cancel every job, then stop the
# slurmd's, slurmctld, slurmdbd, mariadbd and munged by the PIDs in $SLURM_TEST_DIR/run (no pkill or
# killall), each with SIGTERM, then SIGKILL after a bounded wait. Safe to run twice, or on a cluster
# whose supervisor was killed. Zombies count as stopped (this machine's PID 1 reaps orphans late).
set -uo pipefail
D=${SLURM_TEST_DIR:-${TMPDIR:-/tmp}/pml-dist-slurm}
export SLURM_CONF=$D/etc/slurm.conf
t0=$(date +%s.%N)

alive() {   # alive PID: running and not a zombie (stat field 3)
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

pid_of() {   # pid_of NAME: the PID in run/NAME.pid if that process is alive and is NAME (minus "-node")
    local pid
    pid=$(cat "$D/run/$1.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && alive "$pid" || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${1%%-*}" ] || return 1
    echo "$pid"
}

stop_daemons() {   # stop_daemons SECONDS NAME...: SIGTERM all, wait up to SECONDS, SIGKILL the rest
    local wait=$1 name pid pids=() left
    shift
    for name in "$@"; do
        pid=$(pid_of "$name") && { kill -TERM "$pid" 2>/dev/null; pids+=("$name:$pid"); }
    done
    for _ in $(seq 1 $((wait * 10))); do
        left=0
        for np in "${pids[@]}"; do alive "${np#*:}" && left=1; done
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    for np in "${pids[@]}"; do
        if alive "${np#*:}"; then
            echo "stop.sh: ${np%%:*} (${np#*:}) ignored SIGTERM for ${wait}s, sending SIGKILL" >&2
            kill -KILL "${np#*:}" 2>/dev/null
        fi
    done
    for name in "$@"; do rm -f "$D/run/$name.pid"; done
}

if [ ! -d "$D/run" ]; then
    echo "stop.sh: no test cluster in $D"
    exit 0
fi

# 1. cancel every job and wait (at most 20 s) until none is running or completing
if pid_of slurmctld >/dev/null; then
    ids=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${ids// /}" ]; then
        # shellcheck disable=SC2086
        timeout 10 scancel $ids 2>/dev/null
        for _ in $(seq 1 200); do
            [ -z "$(timeout 5 squeue -h -t PD,R,CG,CF,S,RQ,RS,SO -o %A 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
fi

# 2. the daemons, compute side first
slurmds=()
for f in "$D"/run/slurmd-*.pid; do [ -e "$f" ] && slurmds+=("$(basename "$f" .pid)"); done
[ ${#slurmds[@]} -eq 0 ] || stop_daemons 10 "${slurmds[@]}"
stop_daemons 10 slurmctld
stop_daemons 10 slurmdbd
stop_daemons 15 mariadbd
stop_daemons 5 munged
for f in "$D"/run/*.pid; do   # anything else start.sh may have launched
    [ -e "$f" ] && stop_daemons 5 "$(basename "$f" .pid)"
done

# 3. let start.sh's supervising shell notice and exit (it holds $D.lock) unless it is our caller
sup=$(cat "$D/supervisor.pid" 2>/dev/null)
if [ -n "$sup" ] && [ "$sup" != "$PPID" ] && [ "$(cat "/proc/$sup/comm" 2>/dev/null)" = bash ]; then
    for _ in $(seq 1 50); do alive "$sup" || break; sleep 0.1; done
    alive "$sup" && echo "stop.sh: supervisor $sup is still running" >&2
fi
rm -f "$D/ready"

echo "slurm test cluster stopped in $(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "%.2f", a-b}')s"
