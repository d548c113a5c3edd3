#!/usr/bin/env bash
# The GPU benchmark of `streamtrain fit`: real tokens/s, MFU against the bf16 matmul peak measured in this
# run, and the share of time spent waiting for data, for
#   bf16 / fp16 / fp32 (TF32 matmuls)      x  the small model (128x4x512) and d_model 512 / 8 layers, 1 GPU
#   bf16 with --compile                    x  both models, 1 GPU
#   bf16 on every GPU (torchrun)           x  both models, when the machine has more than one
# About 6 minutes on one GPU (--seconds per run, 20 by default), under 8 with several.
#
#   bash benchmarks/gpu.sh [--dry-run] [--seconds S] [--data DIR] [--out DIR]
#
# --dry-run: the same matrix in miniature on the CPU (a tiny model and corpus, a few steps, 2 processes for
# "every GPU", no --compile: compiling on a CPU takes minutes), so that CI runs every code path.
# --data: a dataset or JSON/JSONL folder (default: the real instruction corpus, else a generated one).
# --out: keep the runs, their logs and gpu.json there (default: a temporary folder, removed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0 SECONDS_PER_RUN=20 OUT="" DATA=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --seconds) SECONDS_PER_RUN=$2; shift ;;
        --data) DATA=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ -n "$OUT" ]]; then WORK=$OUT; mkdir -p "$WORK"; else WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi

if (( DRY )); then
    DEVICE=cpu NPROC_ALL=2 SIZE_MB=0.3 BATCH_TOKENS=512 COMPILE_RUNS=0
    MODELS=("32x1x64x2")
    LENGTH=(--max-steps 6 --log-every 2)
else
    NPROC_ALL=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if (( NPROC_ALL == 0 )); then
        echo "gpu.sh: error: torch sees no CUDA GPU here (--dry-run runs the miniature on the CPU)" >&2
        exit 2
    fi
    DEVICE=cuda SIZE_MB=64 BATCH_TOKENS=16384 COMPILE_RUNS=1
    MODELS=("128x4x512x4" "512x8x2048x8")
    LENGTH=(--max-seconds "$SECONDS_PER_RUN" --log-every 20)
fi

# One interpreter for the set-up: the dataset (built and converted unless --data is one), the bf16 peak, the
# device's name; each printed on a line of its own.
{ read -r DATA; read -r PEAK; read -r DEVICE_NAME; } < <("$PY" -c "
import sys
from pathlib import Path
import torch
from streamtrain.bench.corpus import build_json_corpus
from streamtrain.bench.machine import cpu_model
from streamtrain.convert import convert
from streamtrain.telemetry import measure_matmul_peak_tflops
data, work, size_mb, device = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
if not data:
    data, what = build_json_corpus(work / 'corpus', 'auto', size_mb)
    print(what, file=sys.stderr)
if not (Path(data) / 'index.json').is_file():
    convert([data], work / 'dataset')
    data = work / 'dataset'
print(data)
print(measure_matmul_peak_tflops(budget_s=0.5, dtype=torch.bfloat16, device=device))
print(torch.cuda.get_device_name() if device == 'cuda' else cpu_model())" "$DATA" "$WORK" "$SIZE_MB" "$DEVICE")
echo "gpu.sh: $DEVICE_NAME, bf16 matmul peak $PEAK TFLOP/s; $NPROC_ALL device(s); runs in $WORK" >&2

RUNS=()
run_fit() {  # LABEL NPROC PRECISION COMPILE(0|1) DxLxFFxH
    local label=$1 nproc=$2 precision=$3 compile=$4 model=$5 d l ff h
    IFS=x read -r d l ff h <<< "$model"
    local launch=("$PY")
    if (( nproc > 1 )); then launch=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc"); fi
    local flags=(--data "$DATA" --out "$WORK/runs/$label" --device "$DEVICE" --precision "$precision"
                 --d-model "$d" --layers "$l" --ff "$ff" --heads "$h" --batch-tokens "$BATCH_TOKENS"
                 --peak-tflops "$PEAK" --quiet "${LENGTH[@]}")
    if (( compile )); then flags+=(--compile); fi
    echo "gpu.sh: $label" >&2
    mkdir -p "$WORK/runs"
    if ! "${launch[@]}" -m streamtrain fit "${flags[@]}" > "$WORK/runs/$label.log" 2>&1; then
        echo "gpu.sh: $label failed; the end of $WORK/runs/$label.log:" >&2
        tail -5 "$WORK/runs/$label.log" >&2
    fi
    RUNS+=("$label=$WORK/runs/$label")
}

for model in "${MODELS[@]}"; do
    for precision in bf16 fp16 fp32; do
        run_fit "$model-$precision-1dev" 1 "$precision" 0 "$model"
    done
    if (( COMPILE_RUNS )); then
        run_fit "$model-bf16-compile-1dev" 1 bf16 1 "$model"
    fi
    if (( NPROC_ALL > 1 )); then
        run_fit "$model-bf16-${NPROC_ALL}dev" "$NPROC_ALL" bf16 0 "$model"
    fi
done

"$PY" benchmarks/gpu_report.py --peak-tflops "$PEAK" --device "$DEVICE_NAME" --out "$WORK/gpu.json" "${RUNS[@]}"
