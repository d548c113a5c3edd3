"""What a trained model does, shown on a held-out dataset: a rollout of one sequence next to the truth, and
the shape of the embeddings, both through the `streamtrain predict` and `streamtrain embed` commands.

    python -m tools.show_use --checkpoint RUN/checkpoints/best.pt --data DIR --out-dir DIR
        [--horizon 5] [--prefix 8] [--classes 0:12] [--fields 12,14,16,17,27]

`--classes START:END`: one-hot class fields shown by name (tools/asm_corpus's opcode classes for 0:12).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from streamtrain.cli import main as streamtrain
from streamtrain.dataset import load_lengths, open_shard, read_index


def _read(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as f:
        return pa.ipc.open_file(f).read_all()


def _sequence(data: Path, seq_id: int) -> np.ndarray:
    index = read_index(data)
    for shard in index.shards:
        if shard.first_id <= seq_id < shard.first_id + shard.num_sequences:
            rows = open_shard(data / shard.file).column("sequence")[seq_id - shard.first_id].as_py()
            return np.asarray(rows, np.float64)
    raise SystemExit(f"{data}: no sequence {seq_id}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--prefix", type=int, default=8)
    p.add_argument("--classes", help="START:END of one-hot class fields, shown by name")
    p.add_argument("--fields", default="", help="comma-separated number fields to show (default: the first 4 not in --classes)")
    args = p.parse_args(argv)
    K, P = args.horizon, args.prefix
    rollout_path, embed_path = args.out_dir / "rollout.arrow", args.out_dir / "embed.arrow"
    common = ["--checkpoint", args.checkpoint, "--data", str(args.data), "--device", "cpu", "--quiet"]
    for argv_ in (["predict", *common, "--out", str(rollout_path), "--horizon", str(K), "--prefix", str(P)],
                  ["embed", *common, "--out", str(embed_path)]):
        print("$ streamtrain " + " ".join(argv_))
        if streamtrain(argv_) != 0:
            return 1

    lengths = np.asarray(load_lengths(read_index(args.data)))
    table = _read(rollout_path)
    ids = np.asarray(table.column("id").to_pylist())
    held = sorted(i for i in ids if lengths[i] >= P + K)
    if not held:
        print(f"no sequence of {args.data} holds {P} + {K} vectors")
        return 1
    seq_id = held[len(held) // 2]  # a typical one, not the shortest
    row = int(np.flatnonzero(ids == seq_id)[0])
    rollout = np.asarray(table.column("rollout")[row].as_py(), np.float64)
    truth = _sequence(args.data, seq_id)
    classes = tuple(int(v) for v in args.classes.split(":")) if args.classes else None
    in_classes = (lambda d: classes[0] <= d < classes[1]) if classes else (lambda d: False)
    fields = [int(f) for f in args.fields.split(",") if f] or [d for d in range(truth.shape[1]) if not in_classes(d)][:4]
    names = None
    if classes is not None and classes == (0, 12):
        from tools.asm_corpus.fields import CLASS_NAMES

        names = CLASS_NAMES

    print(f"\nsequence {seq_id} of {args.data} ({lengths[seq_id]} vectors): {K} steps rolled out after its first {P}")
    header = f"{'step':>4}  " + ("{:<34}".format("class: truth | model (p)") if classes else "")
    header += "  ".join(f"f{d}: truth | model" for d in fields)
    print(header)
    for k in range(K):
        t, m = truth[P + k], rollout[k]
        line = f"{P + k:>4}  "
        if classes:
            a, b = classes
            tc, mc = int(t[a:b].argmax()), int(m[a:b].argmax())
            show = (lambda c: names[c]) if names else str
            line += "{:<34}".format(f"{show(tc)} | {show(mc)} ({m[a + mc]:.2f}){'' if tc == mc else ' x'}")
        line += "  ".join(f"{t[d]:>8.3f} | {m[d]:<8.3f}" for d in fields)
        print(line)
    numbers = [d for d in range(truth.shape[1]) if not in_classes(d)]
    err = ((rollout[:, numbers] - truth[P : P + K][:, numbers]) ** 2).mean(axis=1)
    persistence = ((truth[P - 1, numbers] - truth[P : P + K][:, numbers]) ** 2).mean(axis=1)
    print("mse per step, model:       " + " ".join(f"{v:.4f}" for v in err))
    print("mse per step, persistence: " + " ".join(f"{v:.4f}" for v in persistence))

    emb = _read(embed_path)
    width = emb.schema.field("embedding").type.list_size
    print(f"\nembeddings: {emb.num_rows} rows x {width} floats ({embed_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
