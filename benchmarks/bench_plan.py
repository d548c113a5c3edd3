"""What planning an epoch costs one process, at dataset sizes no disk here holds: N synthetic heavy-tailed
lengths (median 30, p99 ~1000), in shards of --shard-sequences, and the padding of the windowed plan
against its window size.

    python benchmarks/bench_plan.py                          # 100 M lengths, 8 ranks x 4 workers' share
    python benchmarks/bench_plan.py --sequences 30e6 --window 8
    python benchmarks/bench_plan.py --sequences 1e5 --data DIR     # the padding table of a real dataset

Scaling: a dataset folder is written with a real lengths file and index.json (with the length histogram
convert stores) but sparse shard files (their sizes only; nothing reads them), then a fresh process builds
`ShardStream(folder, rank=r, world_size=W, verify=False)` and asks for its first batch's rows, as a rank or
a DataLoader worker does before its first read. Reported: wall time to the first batch's rows, and the
process's anonymous resident memory (RssAnon: what is not the shared, memory-mapped lengths file) after it,
minus that of a process that only imported the package. Medians of --repeats fresh processes.

Padding: the share of padded batch tokens that are padding, over a whole epoch's plan, for each window size (in shards), on the same
lengths (or on a real dataset with --data), from the plan alone. Padding comes from rounding a length up to
its bucket's bound, so it does not depend on the window; what the window changes is how many batches are
smaller than the budget (a remainder emitted early), shown as batches and as fill: padded tokens over
batches x max_tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from corpus import lognormal_lengths  # benchmarks/corpus.py

from streamtrain.dataset import Index, ShardInfo, write_index
from streamtrain.dataset.stats import length_histogram_json

_CHILD = r"""
import json, os, sys, time
def rss_anon_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))
import numpy as np
from streamtrain.data import ShardStream
base = rss_anon_kb()
root, rank, world, window, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
t0 = time.perf_counter()
ds = ShardStream(root, max_tokens=max_tokens, seed=0, rank=rank, world_size=world, window=window, verify=False)
mine = ds.rank_batches(0)
rows = ds.plan(0).batch(int(mine[0]))
first_s = time.perf_counter() - t0
print(json.dumps({"first_batch_s": first_s, "rss_anon_mb": (rss_anon_kb() - base) / 1024,
                  "rows": len(rows), "batches": int(ds.num_global_batches(0))}))
"""


def write_lengths_dataset(root: Path, lengths: np.ndarray, shard_sequences: int, dim: int = 28) -> Index:
    """A dataset folder whose shards are sparse files of plausible sizes: the plan reads only the lengths."""
    (root / "shards").mkdir(parents=True, exist_ok=True)
    np.save(root / "lengths.npy", lengths.astype(np.int32))
    shards = []
    for k, a in enumerate(range(0, len(lengths), shard_sequences)):
        part = lengths[a : a + shard_sequences]
        name = f"shards/shard-{k:06d}.arrow"
        size = int(part.sum()) * dim * 4 + 8 * len(part) + 4096
        with open(root / name, "wb") as f:
            f.truncate(size)
        shards.append(ShardInfo(name, len(part), int(part.sum()), size, "0" * 64, a))
    index = Index(root, dim, len(lengths), int(lengths.sum()), shards, np.zeros(dim), np.ones(dim),
                  extra={"length_histogram": length_histogram_json(lengths)})
    write_index(index)
    return index


def scaling(root: Path, ranks: int, window: int | None, max_tokens: int, repeats: int) -> dict:
    runs = []
    for r in range(repeats):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(r % ranks), str(ranks), json.dumps(window),
                              str(max_tokens)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    out = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    # the first process computes the bucket bounds and leaves them in the node's cache for the others
    out["first_process_s"] = runs[0]["first_batch_s"]
    return out


def padding_by_window(root: Path, windows: list[int | None], max_tokens: int) -> dict:
    from streamtrain.data import ShardStream

    out = {}
    for w in windows:
        ds = ShardStream(root, max_tokens=max_tokens, seed=0, window=w, verify=False)
        plan = ds.plan(0)
        label = "all" if w is None else (f"auto ({ds.window})" if w == "auto" else str(w))
        out[label] = {
            "pad_pct": 100 * plan.pad_fraction, "batches": int(plan.num_batches),
            # how full batches are against the budget: the smaller batches a window forces cost steps
            "fill_pct": 100 * plan.padded_tokens / (plan.num_batches * max_tokens) if plan.num_batches else 0.0,
        }
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=float, default=100e6)
    p.add_argument("--shard-sequences", type=int, default=15_000, help="sequences per shard (~64 MB of real data)")
    p.add_argument("--ranks", type=int, default=8, help="world size the processes plan for")
    p.add_argument("--window", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="shards per window of the plan (default auto: about 256 MB of shards)")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", type=Path, help="a real dataset for the padding table (default: the synthetic lengths)")
    p.add_argument("--pad-sequences", type=float, default=2e6, help="synthetic lengths for the padding table")
    p.add_argument("--no-record", action="store_true", help="do not append the result to benchmarks/history.jsonl")
    args = p.parse_args(argv)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["STREAMTRAIN_CACHE_DIR"] = str(Path(tmp) / "cache")  # a cold node cache for this run
        root = Path(tmp) / "ds"
        n = int(args.sequences)
        t0 = time.perf_counter()
        write_lengths_dataset(root, lognormal_lengths(n, seed=3), args.shard_sequences)
        print(f"{n / 1e6:.0f} M lengths in {-(-n // args.shard_sequences)} shards written in {time.perf_counter() - t0:.1f} s")
        results["scaling"] = scaling(root, args.ranks, args.window, args.max_tokens, args.repeats)
        s = results["scaling"]
        print(f"one process (rank of {args.ranks}, window {args.window}): first batch {s['first_batch_s']:.2f} s "
              f"(median; {s['first_process_s']:.2f} s for the first, which computes the bucket bounds), "
              f"{s['rss_anon_mb']:.0f} MB resident beyond the mapped lengths; {s['batches']} batches in the epoch")
        pad_root = args.data
        if pad_root is None:
            pad_root = Path(tmp) / "pad"
            write_lengths_dataset(pad_root, lognormal_lengths(int(args.pad_sequences), seed=4), args.shard_sequences)
        windows = [1, 2, 4, 8, 16, 32, "auto", None]
        results["padding"] = padding_by_window(pad_root, windows, args.max_tokens)
    print(f"{'window (shards)':<17}{'pad %':>8}{'batches':>10}{'fill %':>9}")
    for w, r in results["padding"].items():
        print(f"{w:<17}{r['pad_pct']:>8.2f}{r['batches']:>10}{r['fill_pct']:>9.2f}")
    results.update(sequences=n, ranks=args.ranks, window=args.window, max_tokens=args.max_tokens,
                   cpu_count=os.cpu_count(), padding_data=str(args.data) if args.data else "synthetic")
    if not args.no_record:
        from streamtrain.bench.history import record_script_run

        print(f"recorded in {record_script_run('plan', results)}", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
