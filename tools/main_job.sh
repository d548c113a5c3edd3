#!/usr/bin/env bash
# The main job, from a fresh machine: environment -> data -> convert -> fit (about a minute) -> eval -> a
# rollout and the embeddings of the held-out set (tools/show_use.py).
#
# Data: real instruction sequences decoded from this machine's binaries (tools/asm_corpus) when it has
# x86-64 ELF binaries and a decoder; otherwise a synthetic learnable corpus. Either way three disjoint sets:
# train, val (fit picks best.pt on it) and test (the reported score, never used for selection). Everything
# lands in ./runs/main and ./data (both git-ignored). Override with FIT_SECONDS, CORPUS_MB, RUN, DATA, and
# DATA_KIND=synthetic to skip the real data.
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
FIT=(--out "$RUN" --amp --epochs 50 --max-seconds "$FIT_SECONDS" --eval-every 100)

if [ "$DATA_KIND" != synthetic ] && $PY -m tools.asm_corpus --check >/dev/null 2>&1; then
    echo "== data: real instruction sequences from this machine's binaries (${CORPUS_MB} MB)"
    rm -rf "$DATA/asm"
    # Whole binaries: 10% to val (selection), 10% to test (report); no function is in two sets.
    $PY -m tools.asm_corpus --out "$DATA/asm" --max-mb "$CORPUS_MB" --seed 0 --split 0.1 --test-split 0.1
    echo "== convert"
    for split in train val test; do
        $ST convert "$DATA/asm/$split" --out "$DATA/$split" --on-error skip
    done
    $ST inspect "$DATA/train"
    echo "== fit (${FIT_SECONDS} s; best.pt by loss on the val binaries)"
    $ST fit --data "$DATA/train" --val-data "$DATA/val" "${FIT[@]}"
    echo "== eval on the test binaries (held out from training and from selection)"
    $ST eval --checkpoint "$RUN/checkpoints/best.pt" --data "$DATA/test" --onehot 0:12
    echo "== what the model does: a rollout on one held-out function next to the truth, and the embeddings"
    $PY -m tools.show_use --checkpoint "$RUN/checkpoints/best.pt" --data "$DATA/test" --out-dir "$RUN/show" \
        --horizon 5 --prefix 8 --classes 0:12 --fields 12,16,17,27
else
    echo "== data: a synthetic learnable corpus (DATA_KIND=$DATA_KIND; real data needs x86-64 binaries and a decoder)"
    # fit --synthetic N,L --seed 0 trains on the first N sequences of the seed-0 system and picks best.pt on
    # 10% of them (--val-fraction). The test set is the next N_TEST sequences of the same system: new draws
    # that fit never sees.
    N=4000 N_TEST=400 LEN=64
    rm -rf "$DATA/synthetic-test-json" "$DATA/synthetic-test"
    $PY - "$DATA/synthetic-test-json/test.jsonl" "$N" "$N_TEST" "$LEN" <<'PYTHON'
import itertools, os, sys

import orjson

from streamtrain.dataset.synthetic import synthetic_sequences

path, n, n_test, length = sys.argv[1], *map(int, sys.argv[2:])
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path, "wb") as out:  # 28 fields: the width of fit's synthetic data
    for sequence in itertools.islice(synthetic_sequences(n + n_test, length, 28, seed=0), n, None):
        out.write(orjson.dumps(sequence, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
PYTHON
    $ST convert "$DATA/synthetic-test-json" --out "$DATA/synthetic-test"
    echo "== fit (${FIT_SECONDS} s; best.pt by loss on the held-out 10%)"
    $ST fit --synthetic "$N,$LEN" --seed 0 --val-fraction 0.1 "${FIT[@]}"
    echo "== eval on the synthetic test set (sequences fit never saw)"
    $ST eval --checkpoint "$RUN/checkpoints/best.pt" --data "$DATA/synthetic-test"
    echo "== what the model does: a rollout on one held-out sequence next to the truth, and the embeddings"
    $PY -m tools.show_use --checkpoint "$RUN/checkpoints/best.pt" --data "$DATA/synthetic-test" --out-dir "$RUN/show" \
        --horizon 5 --prefix 8
fi
echo
echo "run folder: $RUN (config.json, metrics.jsonl, checkpoints/, loss.png, show/: rollout.arrow, embed.arrow)"
