#!/usr/bin/env bash
# The prepared GPU check (issue 26): one script, on a bare single-GPU Linux machine that has a CUDA
# torch and no internet, inside one overall time budget. A lent GPU machine runs one command for at
# most 10 minutes and returns at most 8 files, so the check is deadline-driven: every step runs under
# `timeout -s ABRT` with its share of what is left (PYTHONFAULTHANDLER=1: a hung Python step prints
# its stacks), and after every step OUTDIR holds steps.jsonl, the table (gpu-check.md, .json) and each
# step's log, so a kill at any second returns what was measured up to it. A failed step does not stop
# the later ones. OUTDIR gets at most 8 files; the venv, the demo's run and the .betons go to WORK
# (default ${TMPDIR:-/tmp}/pml-gpu-check).
#
#   bench/gpu.sh [--dry-run] [--budget S] [--share STEP=S] [--wheelhouse DIR] [--python PY] [--images DIR]
#                [--work DIR] OUTDIR
#
#   1. preflight (10 s): torch sees the GPU, numpy/numba/cv2 import, what pml-dist needs and the
#      wheelhouse lacks is installed in range (bench/gpu_preflight.py), make and g++, free /dev/shm;
#   2. install: make setup WHEELHOUSE=DIR PYTHON=PY (no index), then import ffcv, decode a .beton,
#      run `pml-dist --help`;
#   3. throughput at the COCO settings (bench/gpu_throughput.py) on the JPEGs of --images; it prints
#      its JSON after every measurement;
#   4. pytest -m gpu (--timeout=120 per test);
#   5. the demo's whole pipeline on the GPU, cut to fit (one chain, two taus, 3 epochs; one training
#      rank: NCCL wants a GPU per rank; inference keeps its 2 ranks on the one GPU); on failure its
#      failed jobs' log tails are appended to demo.log.
# --budget S: the whole check's seconds (default 480, of the 600 s command); --share STEP=S: one
# step's most seconds (defaults below; a step never gets more than the budget has left). --dry-run (a
# CPU machine; part of the test suite): every step but the GPU ones, i.e. the install into a scratch
# venv, pytest -m gpu (all skip), the demo's plan (`pml-dist status`) instead of the demo, and the
# throughput script at tiny sizes on the CPU.
#
# Preparing a device machine (docs/install.md): here, `make wheelhouse OUT=wheelhouse
# PYTHON_VERSIONS=3.12 SKIP=bench/gpu-machine.txt` with a python3.12 on PATH (pyenv:
# PYENV_VERSION=3.11.7:3.12.1), so that FFCV is prebuilt for it, and `bench/gpu_images.sh gpu-images`; carry both folders and run `bench/gpu.sh $OUT`
# (python3 there is the one with the CUDA torch).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
# Each step's most seconds; the throughput step gets the largest share: it is the check's main answer.
declare -A SHARE=([preflight]=15 [install]=120 [throughput]=170 [gpu_tests]=150 [demo]=600)
DRY=0 BUDGET=480 WHEELHOUSE=$REPO/wheelhouse PYTHON=python3 IMAGES=$REPO/gpu-images
WORK=${TMPDIR:-/tmp}/pml-gpu-check
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --budget) BUDGET=$2; shift ;;
        --share) SHARE[${2%%=*}]=${2#*=}; shift ;;
        --wheelhouse) WHEELHOUSE=$(cd "$2" && pwd) || exit 2; shift ;;
        --python) PYTHON=$2; shift ;;
        --images) IMAGES=$2; shift ;;
        --work) WORK=$2; shift ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        -*) echo "gpu.sh: unknown option $1" >&2; exit 2 ;;
        *) OUTDIR=$1 ;;
    esac
    shift
done
[ -n "${OUTDIR:-}" ] || { echo "gpu.sh: give the folder the table is written to" >&2; exit 2; }
mkdir -p "$OUTDIR" "$WORK" && OUTDIR=$(cd "$OUTDIR" && pwd) && WORK=$(cd "$WORK" && pwd)
VENV=$WORK/venv
PY=$VENV/bin/python
STEPS=$OUTDIR/steps.jsonl
: >"$STEPS"
rm -f "$WORK/throughput.json" "$WORK/demo-report.json"  # an earlier check's results are not this one's
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
DEADLINE=$(($(date +%s) + BUDGET))
TABLE_S=10  # kept back at the end for the last table

# The table from what is there now (each step calls it, so OUTDIR is complete after every step).
table() {
    local py=$PY
    [ -x "$py" ] || py=$PYTHON
    timeout -k 2 20 "$py" "$REPO/bench/gpu_table.py" "$WORK" "$OUTDIR" $([ $DRY = 1 ] && echo --dry-run) \
        >/dev/null 2>>"$OUTDIR/install.log"
}

# step NAME COMMAND...: run it under `timeout` with at most its share of seconds (less when the budget
# has less left), its output in OUTDIR/NAME.log; record status and seconds, rewrite the table.
step() {
    local name=$1 share=${SHARE[$1]}; shift
    local left=$((DEADLINE - TABLE_S - $(date +%s)))
    if [ "$left" -lt 5 ]; then
        echo "== $name: skipped, the budget is spent"
        printf '{"step": "%s", "rc": -1, "seconds": 0, "limit_s": 0, "note": "skipped: budget spent"}\n' \
            "$name" >>"$STEPS"
        return 1
    fi
    [ "$share" -gt "$left" ] && share=$left
    local start end rc
    start=$(date +%s%N)
    echo "== $name (at most ${share} s): $*"
    # timeout signals the step's whole process group (pytest's and submitit's children too)
    timeout -s ABRT -k 10 "$share" bash -c "$*" >"$OUTDIR/$name.log" 2>&1
    rc=$?
    end=$(date +%s%N)
    printf '{"step": "%s", "rc": %d, "seconds": %d.%d, "limit_s": %d%s}\n' "$name" "$rc" \
        $(((end - start) / 1000000000)) $(((end - start) / 100000000 % 10)) "$share" \
        "$([ $rc = 124 ] || [ $rc = 134 ] || [ $rc = 137 ] && echo ', "note": "cut off at its time limit"')" \
        >>"$STEPS"
    [ $rc = 0 ] && echo "   ok" || { echo "   FAILED (exit $rc), last lines of $OUTDIR/$name.log:"; tail -5 "$OUTDIR/$name.log"; }
    table
    return $rc
}

preflight() {
    echo "machine: $(uname -m), $(nproc) cores; $(free -g | awk '/Mem:/ {print $2 " GiB memory"}')"
    local bad=0
    for tool in make g++; do command -v $tool >/dev/null && echo "$tool: ok" || { echo "MISSING: $tool"; bad=1; }; done
    echo "/dev/shm: $(df -h /dev/shm | awk 'NR == 2 {print $4 " free of " $2}')"
    "$PYTHON" "$REPO/bench/gpu_preflight.py" "$WHEELHOUSE" $([ $DRY = 1 ] && echo --dry-run) || bad=1
    return $bad
}

install() {
    make -C "$REPO" setup WHEELHOUSE="$WHEELHOUSE" PYTHON="$PYTHON" VENV="$VENV" &&
        "$PY" "$REPO/bench/gpu_smoke.py" "$WORK/smoke" &&
        "$VENV/bin/pml-dist" --help >/dev/null && echo "pml-dist --help: ok"
}

throughput() {
    cd "$REPO" || return 1
    if [ $DRY = 1 ]; then
        "$PY" bench/gpu_throughput.py --tiny --device cpu --images "$IMAGES" --out "$WORK/throughput.json"
    else
        "$PY" bench/gpu_throughput.py --device cuda --images "$IMAGES" --out "$WORK/throughput.json"
    fi
}

gpu_tests() {
    cd "$REPO" && "$PY" -m pytest -m gpu -q -p no:cacheprovider --timeout=120 --durations=15 \
        -o addopts="-ra --strict-markers --import-mode=importlib" tests
}

demo() {
    cd "$REPO" || return 1
    # The demo cut to fit: every stage (data, teacher, sharded inference, merge, students, report),
    # one chain and two taus, 3 epochs, on the GPU.
    local GPU_DEMO=(train.device=cuda slurm.teacher_tasks_per_node=1 slurm.student_tasks_per_node=1
                    train.epochs=3 "pseudo.teachers=[an]" "pseudo.taus=[0.2,0.3]" "report.references=[]")
    local run=$WORK/demo-run rc
    if [ $DRY = 1 ]; then
        "$VENV/bin/pml-dist" status --config configs/demo.yaml run.dir="$run" "${GPU_DEMO[@]}"
        return
    fi
    rm -rf "$run"
    "$VENV/bin/pml-dist" run --executor local --config configs/demo.yaml run.dir="$run" "${GPU_DEMO[@]}"
    rc=$?
    [ -f "$run/report.json" ] && cp "$run/report.json" "$WORK/demo-report.json"
    if [ $rc != 0 ]; then  # the jobs' own logs stay in WORK: their failing ends come back here
        grep -l -E "Traceback|Error" "$run"/logs/submitit/*/*.err 2>/dev/null | head -4 | while read -r f; do
            echo "--- $f"; tail -25 "$f"
        done
    fi
    return $rc
}

# Each step runs in a `bash -c` of its own under timeout: it needs the functions and settings.
export -f preflight install throughput gpu_tests demo
export REPO DRY WHEELHOUSE PYTHON IMAGES WORK VENV PY
step preflight preflight
step install install || echo "gpu.sh: the install failed; the steps below need its venv" >&2
if [ -x "$PY" ]; then
    step throughput throughput
    step gpu_tests gpu_tests
    step demo demo
fi
table
# The exit status says whether every step passed.
! grep -q '"rc": -\?[1-9]' "$STEPS"
