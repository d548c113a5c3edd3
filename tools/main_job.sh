#!/usr/bin/env bash
# The main job, from a fresh machine: environment -> data -> convert -> fit (about a minute) -> eval.
#
# Data: real instruction sequences decoded from this machine's binaries (tools/asm_corpus) when it has
# x86-64 ELF binaries and a decoder; otherwise a synthetic learnable corpus. Everything lands in ./runs/main
# and ./data (both git-ignored). Override with FIT_SECONDS, CORPUS_MB, RUN, DATA, and DATA_KIND=synthetic to
# skip the real data.
set -euo pipefail
cd "$(dirname "$0")/.."
FIT_SECONDS=${FIT_SECONDS:-60}
CORPUS_MB=${CORPUS_MB:-20}
DATA=${DATA:-data}
RUN=${RUN:-runs/main}
DATA_KIND=${DATA_KIND:-auto}

bash tools/setup_env.sh plot,corpus
rm -rf "$RUN"  # the main job's own run folder: each run of this script starts a new one
PY=.venv/bin/python
ST=.venv/bin/streamtrain

if [ "$DATA_KIND" != synthetic ] && $PY -m tools.asm_corpus --check >/dev/null 2>&1; then
    echo "== data: real instruction sequences from this machine's binaries (${CORPUS_MB} MB)"
    rm -rf "$DATA/asm"
    $PY -m tools.asm_corpus --out "$DATA/asm" --max-mb "$CORPUS_MB" --seed 0 --split 0.1
    echo "== convert"
    $ST convert "$DATA/asm/train" --out "$DATA/train" --on-error skip
    $ST convert "$DATA/asm/val" --out "$DATA/val" --on-error skip
    $ST inspect "$DATA/train"
    echo "== fit (${FIT_SECONDS} s)"
    $ST fit --data "$DATA/train" --val-data "$DATA/val" --out "$RUN" --amp --epochs 50 --max-seconds "$FIT_SECONDS" --eval-every 100
    echo "== eval on held-out binaries"
    $ST eval --checkpoint "$RUN/checkpoints/best.pt" --data "$DATA/val" --onehot 0:12
else
    echo "== data: a synthetic learnable corpus (DATA_KIND=$DATA_KIND; real data needs x86-64 binaries and a decoder)"
    $ST fit --synthetic 4000,64 --val-fraction 0.1 --out "$RUN" --amp --epochs 50 --max-seconds "$FIT_SECONDS" --eval-every 100
    echo "== eval on the whole synthetic set (fit's last line above is the held-out 10%)"
    $ST eval --checkpoint "$RUN/checkpoints/best.pt" --data "$RUN/synthetic"
fi
echo
echo "run folder: $RUN (config.json, metrics.jsonl, checkpoints/, loss.png)"
