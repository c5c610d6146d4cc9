#!/usr/bin/env bash
# The prepared GPU check (issue 12): one script, on a bare single-GPU Linux machine that has a CUDA
# torch and no internet, inside 8 minutes end to end. Each step is timed, its log kept, and a failed
# step does not stop the later ones. OUTDIR gets six files: one log per step and the table,
# gpu-check.md and gpu-check.json; everything else (the venv, the demo's run, the .beton) goes to
# WORK (default ${TMPDIR:-/tmp}/pml-gpu-check).
#
#   bench/gpu.sh [--dry-run] [--wheelhouse DIR] [--python PY] [--images DIR] [--work DIR] OUTDIR
#
#   1. install: make setup WHEELHOUSE=DIR PYTHON=PY (no index; FFCV built there if the wheelhouse has
#      none for PY), then import ffcv, decode a .beton, run `pml-dist --help`;
#   2. pytest -m gpu;
#   3. the demo's whole pipeline on the GPU (configs/demo.yaml, train.device=cuda, one training rank:
#      NCCL wants a GPU per rank; inference keeps its 2 ranks on the one GPU), each stage timed;
#   4. throughput at the COCO settings (bench/gpu_throughput.py) on the JPEGs of --images;
#   5. the table.
# --dry-run (a CPU machine; part of the test suite): every step but the GPU ones, i.e. the install
# into a scratch venv, pytest -m gpu (all skip), the demo's plan (`pml-dist status`) instead of the
# demo, and the throughput script at tiny sizes on the CPU.
#
# Preparing a device machine (docs/install.md): here, `make wheelhouse OUT=wheelhouse
# PYTHON_VERSIONS=3.12 SKIP=bench/gpu-machine.txt` and `bench/gpu_images.sh gpu-images` (a subset of
# ../shared/data/coco-mini that fits the copy); carry both folders and run `bench/gpu.sh $OUT`
# (python3 there is the one with the CUDA torch).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DRY=0 WHEELHOUSE=$REPO/wheelhouse PYTHON=python3 IMAGES=$REPO/gpu-images WORK=${TMPDIR:-/tmp}/pml-gpu-check
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --wheelhouse) WHEELHOUSE=$(cd "$2" && pwd) || exit 2; shift ;;
        --python) PYTHON=$2; shift ;;
        --images) IMAGES=$2; shift ;;
        --work) WORK=$2; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        -*) echo "gpu.sh: unknown option $1" >&2; exit 2 ;;
        *) OUTDIR=$1 ;;
    esac
    shift
done
[ -n "${OUTDIR:-}" ] || { echo "gpu.sh: give the folder the table is written to" >&2; exit 2; }
mkdir -p "$OUTDIR" "$WORK" && OUTDIR=$(cd "$OUTDIR" && pwd) && WORK=$(cd "$WORK" && pwd)
VENV=$WORK/venv
PY=$VENV/bin/python
STEPS=$WORK/steps.jsonl
: >"$STEPS"
export PYTHONUNBUFFERED=1

# step NAME COMMAND...: run it with its output in OUTDIR/NAME.log, record status and seconds.
step() {
    local name=$1; shift
    local start end rc
    start=$(date +%s%N)
    echo "== $name: $*"
    "$@" >"$OUTDIR/$name.log" 2>&1
    rc=$?
    end=$(date +%s%N)
    printf '{"step": "%s", "rc": %d, "seconds": %d.%d}\n' "$name" "$rc" $(((end - start) / 1000000000)) \
        $(((end - start) / 100000000 % 10)) >>"$STEPS"
    [ $rc = 0 ] && echo "   ok" || { echo "   FAILED (exit $rc), last lines of $OUTDIR/$name.log:"; tail -5 "$OUTDIR/$name.log"; }
    return $rc
}

install() {
    make -C "$REPO" setup WHEELHOUSE="$WHEELHOUSE" PYTHON="$PYTHON" VENV="$VENV" &&
        "$PY" "$REPO/bench/gpu_smoke.py" "$WORK/smoke" &&
        "$VENV/bin/pml-dist" --help >/dev/null && echo "pml-dist --help: ok"
}

gpu_tests() {
    cd "$REPO" && "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="-ra --strict-markers --import-mode=importlib" tests
}

GPU_DEMO=(train.device=cuda slurm.teacher_tasks_per_node=1 slurm.student_tasks_per_node=1)
demo() {
    cd "$REPO" || return 1
    local run=$WORK/demo-run
    if [ $DRY = 1 ]; then
        "$VENV/bin/pml-dist" status --config configs/demo.yaml run.dir="$run" "${GPU_DEMO[@]}"
    else
        rm -rf "$run"
        timeout 240 "$VENV/bin/pml-dist" run --executor local --config configs/demo.yaml run.dir="$run" \
            "${GPU_DEMO[@]}" && cp "$run/report.json" "$WORK/demo-report.json"
    fi
}

throughput() {
    cd "$REPO" || return 1
    if [ $DRY = 1 ]; then
        "$PY" bench/gpu_throughput.py --tiny --device cpu --images "$IMAGES" --out "$WORK/throughput.json"
    else
        timeout 150 "$PY" bench/gpu_throughput.py --device cuda --images "$IMAGES" --out "$WORK/throughput.json"
    fi
}

step install install || { echo "gpu.sh: the install failed; nothing else can run" >&2; }
if [ -x "$PY" ]; then
    step gpu_tests gpu_tests
    step demo demo
    step throughput throughput
    "$PY" "$REPO/bench/gpu_table.py" "$WORK" "$OUTDIR" $([ $DRY = 1 ] && echo --dry-run)
fi
# The exit status says whether every step passed.
! grep -q '"rc": [1-9]' "$STEPS"
