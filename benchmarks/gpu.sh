#!/usr/bin/env bash
# GPU benchmark: trains cifar10, hotdog, banana and voc a few epochs each on 1 GPU (1 Ray Train worker,
# --gpus-per-worker 1, which turns on bfloat16 autocast and channels-last), runs style transfer's demo pairs on the
# GPU, then prints examples/sec per task next to d2l's printed figures (benchmarks/gpu_report.py) and writes the
# table to benchmarks/gpu_results.md (and to $OUT/ when $OUT is set, as on a lent device machine).
#
# The datasets are raycv's demo sets (written here if missing): small epochs, but the book's per-example work
# (cifar10: ResNet-18 at width 64, 32 px, batch 256; hotdog: ResNet-18 from scratch at 224 px on hotdog-source's
# 1,200 training images, batch 128; banana: TinySSD width 1.0 at 256 px, batch 32; voc: FCN from scratch on
# 320x480 crops, small images padded, batch 32). So demo-size examples/sec are not the book's full-size runs.
# Nothing is downloaded: hotdog and voc train from scratch, style transfer uses VGG-19 weights only if they are in
# the torch hub cache (else random features: same speed).
#
# Under 10 minutes: the whole script has RAYCV_GPU_BUDGET_S (540 s) and each command at most
# RAYCV_GPU_CMD_S (120 s), cut to what is left; a command that runs out is killed, and the table still shows the
# epochs it logged to MLflow.
#
#   benchmarks/gpu.sh                      # on a machine with a CUDA GPU
#   RAYCV_GPU_DRY_RUN=1 benchmarks/gpu.sh  # the same commands on CPU: --gpus-per-worker 0, 1 epoch, CPU demo
#                                          # sizes, train.channels_last=true (its CPU path); checks the plumbing
#
# Environment: RAYCV_BIN (the raycv command; default .venv/bin/raycv, else raycv on PATH, else python -m
# pipelines), PYTHON (for the report; default .venv/bin/python, else raycv's interpreter, else python3),
# RAYCV_GPU_DATA (demo data folder, default data/demo), RAYCV_GPU_EPOCHS (default 4), RAYCV_GPU_WORK (scratch
# folder: MLflow store, checkpoints, logs; default a new temp folder), RAYCV_GPU_RESULTS (the Markdown table).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, also in Ray's worker processes
DRY=${RAYCV_GPU_DRY_RUN:-0}
die() { echo "gpu.sh: $*" >&2; exit 1; }

# --- the raycv command and the Python that runs the report ---------------------------------------------------
PY=${PYTHON:-}
if [[ -n ${RAYCV_BIN:-} ]]; then
    read -r -a RAYCV <<< "$RAYCV_BIN"
elif [[ -x $REPO/.venv/bin/raycv ]]; then
    RAYCV=("$REPO/.venv/bin/raycv")
    PY=${PY:-$REPO/.venv/bin/python}
elif command -v raycv > /dev/null; then
    RAYCV=(raycv)
    shebang=$(head -n 1 "$(command -v raycv)")
    if [[ $shebang == '#!'* && -x ${shebang#\#!} ]]; then PY=${PY:-${shebang#\#!}}; fi
fi
PY=${PY:-python3}
[[ -n ${RAYCV+set} ]] || RAYCV=("$PY" -m pipelines)
"${RAYCV[@]}" --version > /dev/null 2>&1 || die "cannot run raycv (${RAYCV[*]}): install the project first (make install)"

# --- a GPU, unless this is a dry run ---------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
    GPUS=0 EPOCHS=1 DEVICE="CPU dry run on $(nproc) cores"
    BUDGET=${RAYCV_GPU_BUDGET_S:-1800} CMD_LIMIT=${RAYCV_GPU_CMD_S:-400}
else
    command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1 \
        || die "no NVIDIA GPU here (nvidia-smi missing or failing); RAYCV_GPU_DRY_RUN=1 runs the same commands on CPU"
    "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
        || die "torch ($PY) sees no CUDA device though nvidia-smi does: a CPU-only torch build?"
    GPUS=1 EPOCHS=${RAYCV_GPU_EPOCHS:-4}
    DEVICE="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n 1), $(nproc) CPU cores,"
    DEVICE+=" torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
    BUDGET=${RAYCV_GPU_BUDGET_S:-540} CMD_LIMIT=${RAYCV_GPU_CMD_S:-120}
fi
DEADLINE=$((SECONDS + BUDGET))
REPORT_RESERVE=20  # seconds kept for the report

WORK=${RAYCV_GPU_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/raycv-gpu.XXXXXX")}
mkdir -p "$WORK/logs"
DATA=${RAYCV_GPU_DATA:-$REPO/data/demo}
TRACKING="sqlite:///$WORK/mlflow.db"
STATUS=$WORK/status.tsv
: > "$STATUS"
if [[ $DRY == 1 ]]; then
    RESULTS=${RAYCV_GPU_RESULTS:-$WORK/gpu_results_dry_run.md}
else
    RESULTS=${RAYCV_GPU_RESULTS:-$REPO/benchmarks/gpu_results.md}
fi
echo "gpu.sh: $DEVICE; raycv: ${RAYCV[*]}; work folder $WORK; budget ${BUDGET} s"

# step NAME LIMIT COMMAND...: runs COMMAND under a timeout (at most LIMIT s and what the budget has left), its
# output in $WORK/logs/NAME.log; records "NAME<TAB>ok|timed out|failed (rc N)|skipped<TAB>seconds" and goes on.
step() {
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - SECONDS - REPORT_RESERVE))
    ((limit < left)) || limit=$left
    if ((limit < 15)); then
        printf '%s\tskipped (out of time)\t0\n' "$name" >> "$STATUS"
        echo "  $name: skipped, the budget is spent"
        return 0
    fi
    local started=$SECONDS rc=0
    echo "  $name: running (at most ${limit} s)"
    echo "+ $*" > "$WORK/logs/$name.log"
    # SIGINT first: raycv's driver then shuts its local Ray down (and frees the GPU) before the next command.
    timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$WORK/logs/$name.log" 2>&1 || rc=$?
    local took=$((SECONDS - started)) status=ok
    if ((rc == 124 || rc == 137)); then status="timed out"; elif ((rc != 0)); then status="failed (rc $rc)"; fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$took" >> "$STATUS"
    echo "  $name: $status in ${took} s"
    if [[ $status != ok ]]; then tail -n 5 "$WORK/logs/$name.log" | sed 's/^/    | /'; fi
}

train() {  # train TASK [--set KEY=VALUE ...]
    local task=$1; shift
    local extra=()
    # The dry run exercises channels-last's CPU path (the GPU run gets it from --gpus-per-worker).
    if [[ $DRY == 1 ]]; then extra=(--set train.channels_last=true); fi
    step "$task" "$CMD_LIMIT" "${RAYCV[@]}" train "$task" --data-root "$DATA" --workers 1 --gpus-per-worker "$GPUS" \
        --epochs "$EPOCHS" --tracking-uri "$TRACKING" --storage "$WORK/ray_results" "${extra[@]}" "$@"
}

if [[ $DRY == 1 ]]; then  # the configs' CPU demo sizes
    CIFAR=() HOTDOG=(--set augment.size=64 --set augment.resize_size=72 --set data.batch_size=16) BANANA=() VOC=()
    STYLE=(--steps 4 --size 48 72)
else  # the book's per-example work
    CIFAR=(--set model.width=64)
    HOTDOG=()
    BANANA=(--set augment.size=256 --set model.width=1.0 --set data.batch_size=32)
    VOC=(--set "augment.crop_size=[320, 480]" --set augment.small=pad)
    STYLE=(--steps 200)
fi

step make-demo 120 "${RAYCV[@]}" data make-demo --root "$DATA"  # reuses what is already there
train cifar10 "${CIFAR[@]}"
train hotdog --set model.weights=scratch --set data.dataset=hotdog-source "${HOTDOG[@]}"
train banana "${BANANA[@]}"
train voc "${VOC[@]}"
step style "$CMD_LIMIT" "${RAYCV[@]}" stylize --demo --gpus-per-worker "$GPUS" --tracking-uri "$TRACKING" \
    --output-dir "$WORK/style" "${STYLE[@]}"

SETTINGS="1 worker, --gpus-per-worker $GPUS, $EPOCHS epoch(s); cifar10 ${CIFAR[*]}; hotdog (hotdog-source,"
SETTINGS+=" scratch) ${HOTDOG[*]}; banana ${BANANA[*]}; voc ${VOC[*]}; style ${STYLE[*]}"
REPORT=(--tracking-uri "$TRACKING" --status "$STATUS" --out "$RESULTS" --device "$DEVICE" --settings "$SETTINGS")
if [[ $DRY == 1 ]]; then REPORT+=(--dry-run); fi
echo
"$PY" "$REPO/benchmarks/gpu_report.py" "${REPORT[@]}"
if [[ -n ${OUT:-} && -d $OUT ]]; then
    cp "$RESULTS" "$STATUS" "$OUT/"
    mkdir -p "$OUT/logs" && cp "$WORK"/logs/*.log "$OUT/logs/"
fi
echo "gpu.sh: done in ${SECONDS} s (logs in $WORK/logs)"
