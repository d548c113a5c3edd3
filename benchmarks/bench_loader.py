"""Loader throughput, side by side in one run: ShardStream (0/1/2 workers; with 2 workers also handing each
batch over as tensors, DataLoader's own way, and per --block-sizes batches per worker message) vs the seed-style pipeline
(JSON-loaded tensors, random batches of 16, pad_sequence) vs Hugging Face `datasets` (optional peer),
against this machine's memcpy bound.

    python benchmarks/bench_loader.py                       # real instruction data if possible, else synthetic
    python benchmarks/bench_loader.py --data DIR            # an existing dataset

For each pipeline: real (non-pad) tokens/s over whole epochs (median of --repeats), pad fraction, and the
time to the first batch (including whatever loading the pipeline does before it can yield one). The
memcpy bound is np.copyto of a large buffer, in tokens/s counting the bytes read and written per token
(2 * D * 4), the same traffic as copying a token from the map into a batch. The JSON peers read a
subset of the corpus (--peer-sequences) because their loading holds every float as a Python object.
The last line is one JSON object with every figure.

`--remote`: from s3:// (a SeaweedFS server on this machine) against local disk, see bench_remote.py.

Checksums (`ShardStream(verify=...)`), side by side with 0 and 2 workers: epoch throughput measured from
building the stream (where the up-front pass hashes) to the last batch, for verify off, warm (every file
version recorded, as a later run finds it), cold (no record: the first run after convert), and naive
(hash each shard the first time each process maps it: no up-front pass, no records), each with its cost
in % of the throughput with verify off. Also how many shards the first batches of an epoch need, which
bounds what hashing in the background while loading could hide. `--verify-only` runs just this part.
The other pipelines run with verify on and warm records (the default a user gets).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from corpus import KINDS, build_dataset  # benchmarks/corpus.py

from streamtrain.bench.loader_bench import (
    export_json,
    hf_datasets_batches,
    measure_pipeline,
    memcpy_tokens_per_s,
    seed_style_batches,
    shardstream_batches,
)
from streamtrain.data import ShardStream, make_loader
from streamtrain.data import stream as stream_module
from streamtrain.dataset import checksums, read_index


def bench_shardstream(root: Path, max_tokens: int, num_workers: int, repeats: int) -> dict:
    return measure_pipeline(shardstream_batches(root, max_tokens, num_workers), repeats)


def bench_tensor_handover(root: Path, max_tokens: int, num_workers: int, repeats: int) -> dict:
    """ShardStream under a bare DataLoader: each batch's five tensors go through torch's shared-memory
    IPC (a segment per tensor per batch), the hand-over a Loader replaces with its ring."""
    from torch.utils.data import DataLoader

    def run(r):
        ds = ShardStream(root, max_tokens=max_tokens, seed=0)
        ds.set_epoch(r)
        ds.publish_position()
        for batch in DataLoader(ds, batch_size=None, num_workers=num_workers, prefetch_factor=4):
            yield batch.x, batch.lengths

    return measure_pipeline(run, repeats)


def bench_block_size(root: Path, max_tokens: int, num_workers: int, block: int, repeats: int) -> dict:
    from streamtrain.data import stream

    saved = stream.BATCHES_PER_MESSAGE
    stream.BATCHES_PER_MESSAGE = block  # read when the loader is made; forked workers inherit it
    try:
        return bench_shardstream(root, max_tokens, num_workers, repeats)
    finally:
        stream.BATCHES_PER_MESSAGE = saved


def bench_seed_style(json_path: Path, batch_size: int, repeats: int) -> dict:
    return measure_pipeline(seed_style_batches(json_path, batch_size), repeats)


def bench_hf_datasets(jsonl_path: Path, batch_size: int, repeats: int, cache_dir: Path) -> dict | None:
    run = hf_datasets_batches(jsonl_path, batch_size, cache_dir)
    if run is None:
        return None
    import datasets

    return {**measure_pipeline(run, repeats), "version": datasets.__version__}


VERIFY_MODES = ("off", "warm", "cold", "naive")


def _verify_epoch(root: Path, max_tokens: int, num_workers: int, mode: str, cache: Path, epoch: int) -> dict:
    """One epoch from building the stream to its last batch, with checksums per `mode` (see the docstring)."""
    saved_env, saved_verify_files = os.environ.get("STREAMTRAIN_CACHE_DIR"), stream_module.verify_files
    if mode == "cold":
        cold = cache.parent / f"cold-{num_workers}-{epoch}"  # empty: nothing recorded
        os.environ["STREAMTRAIN_CACHE_DIR"] = str(cold)
    elif mode == "naive":
        os.environ["STREAMTRAIN_CACHE_DIR"] = str(cache.parent / "no-cache-here" / "x")  # under a file: unusable
        (cache.parent / "no-cache-here").write_text("")
        stream_module.verify_files = lambda files, threads=None: 0  # forked workers inherit the patch
    checksums.forget()  # each epoch starts as a fresh process would
    try:
        t0 = time.perf_counter()
        ds = ShardStream(root, max_tokens=max_tokens, seed=0, verify=mode != "off")
        ds.set_epoch(epoch)
        built = time.perf_counter()
        real = 0
        for batch in make_loader(ds, num_workers=num_workers, persistent_workers=False):
            real += int(batch.lengths.sum())
        end = time.perf_counter()
    finally:
        stream_module.verify_files = saved_verify_files
        if saved_env is None:
            os.environ.pop("STREAMTRAIN_CACHE_DIR", None)
        else:
            os.environ["STREAMTRAIN_CACHE_DIR"] = saved_env
    return {"epoch_tokens_per_s": real / (end - t0), "build_s": built - t0}


def bench_verify(root: Path, max_tokens: int, repeats: int, cache: Path) -> dict:
    """Epoch throughput per (workers, mode); modes interleaved within each repeat, in an order rotated from one
    repeat to the next (whatever runs first after a switch runs slower), medians over repeats."""
    ShardStream(root, max_tokens=max_tokens)  # records for "warm"
    runs: dict[str, list[dict]] = {}
    for workers in (0, 2):
        _verify_epoch(root, max_tokens, workers, "off", cache, 0)  # warm-up, not counted
        for r in range(repeats):
            for k in range(len(VERIFY_MODES)):
                mode = VERIFY_MODES[(r + k) % len(VERIFY_MODES)]
                runs.setdefault(f"w{workers}_{mode}", []).append(_verify_epoch(root, max_tokens, workers, mode, cache, r))
    out = {}
    for name, results in runs.items():
        out[name] = {k: statistics.median(res[k] for res in results) for k in results[0]}
    for workers in (0, 2):
        off = out[f"w{workers}_off"]["epoch_tokens_per_s"]
        for mode in VERIFY_MODES:
            out[f"w{workers}_{mode}"]["cost_pct"] = 100 * (1 - out[f"w{workers}_{mode}"]["epoch_tokens_per_s"] / off)
    return out


def shards_needed_first(root: Path, max_tokens: int, first: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """Share of the shards that the first k batches of epoch 0 read rows from."""
    ds = ShardStream(root, max_tokens=max_tokens, seed=0, verify=False)
    plan, mine = ds.plan(0), ds.rank_batches(0)
    offsets = ds.index.shard_offsets
    share = {}
    for k in first:
        ids = np.concatenate([plan.batch(int(b)).ids for b in mine[:k]]) if len(mine) else np.zeros(0, np.int64)
        share[f"first_{k}"] = len(np.unique(np.searchsorted(offsets, ids, side="right") - 1)) / len(ds.index.shards)
    return share


def print_verify(verify: dict, needed: dict[str, float], num_shards: int) -> None:
    print(f"checksums ({num_shards} shards; epoch incl. building the stream; cost vs verify off, same workers):")
    print(f"{'workers':<9}{'verify':<8}{'epoch tokens/s':>16}{'build s':>10}{'cost':>9}")
    for workers in (0, 2):
        for mode in VERIFY_MODES:
            r = verify[f"w{workers}_{mode}"]
            print(f"{workers:<9}{mode:<8}{r['epoch_tokens_per_s'] / 1e6:>14.2f} M{r['build_s']:>10.3f}{r['cost_pct']:>8.1f}%")
    print("shards read by the first batches: " + ", ".join(f"{k.replace('_', ' ')}: {100 * v:.0f}%" for k, v in needed.items()))


def plan_seconds(root: Path, max_tokens: int) -> float:
    """Wall time from building the stream (index, stored histogram, bucket bounds, per-shard counts) to its
    first batch's rows, as each loader process does before it reads (verify off: that cost is above)."""
    t0 = time.perf_counter()
    ds = ShardStream(root, max_tokens=max_tokens, seed=0, verify=False)
    ds.plan(0).batch(int(ds.rank_batches(0)[0]))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="existing dataset folder (default: build one, see --corpus)")
    p.add_argument("--corpus", choices=KINDS, default="auto", help="real instruction data, synthetic, or auto (real if possible)")
    p.add_argument("--real-mb", type=float, default=50, help="size of the real corpus as JSON [MB]")
    p.add_argument("--sequences", type=int, default=40_000, help="synthetic corpus size (sequences)")
    p.add_argument("--dim", type=int, default=28, help="synthetic vector width")
    p.add_argument("--max-tokens", type=int, default=8192, help="ShardStream padded-token budget per batch")
    p.add_argument("--peer-sequences", type=int, default=4_000, help="sequences the JSON peers read")
    p.add_argument("--peer-batch", type=int, default=16, help="batch size of the JSON peers")
    p.add_argument("--repeats", type=int, default=3, help="runs per pipeline (medians are quoted)")
    p.add_argument("--block-sizes", default="1",
                   help="comma-separated batches per worker message to also try with 2 workers ('' for none)")
    p.add_argument("--verify-only", action="store_true", help="only the checksum comparison (cold/warm/off/naive)")
    p.add_argument("--remote", action="store_true",
                   help="only s3:// (SeaweedFS on 127.0.0.1) against local disk, cold and warm (bench_remote.py)")
    p.add_argument("--no-record", action="store_true", help="with --remote: do not append to benchmarks/history.jsonl")
    p.add_argument("--cache-fraction", type=float, default=0.5, help="with --remote: cache limit, share of the data")
    p.add_argument("--window", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="with --remote: shards per plan window (the cache must hold two)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        cache = tmp / "checksum-cache"
        os.environ["STREAMTRAIN_CACHE_DIR"] = str(cache)  # records of this run's corpus stay in it
        root = args.data
        if root is None:
            root = tmp / "corpus"
            t0 = time.perf_counter()
            text = build_dataset(root, args.corpus, num_sequences=args.sequences, real_mb=args.real_mb, dim=args.dim)
            print(f"corpus: {text} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        index = read_index(root)
        lengths = index.lengths()
        dim = index.dim
        if args.remote:
            from bench_remote import bench_remote, print_remote

            remote = bench_remote(root, args.max_tokens, args.repeats, args.cache_fraction, window=args.window)
            print_remote(remote)
            result = {"num_tokens": index.num_tokens, "num_shards": len(index.shards), "remote": remote}
            if not args.no_record:
                from streamtrain.bench.history import record_script_run

                print(f"recorded in {record_script_run('loader_remote', result)}", file=sys.stderr)
            print(json.dumps({"benchmark": "loader_remote", **result}))
            return 0
        verify = bench_verify(root, args.max_tokens, args.repeats, cache)
        needed = shards_needed_first(root, args.max_tokens)
        if args.verify_only:
            print_verify(verify, needed, len(index.shards))
            print(json.dumps({"benchmark": "loader_verify", "num_tokens": index.num_tokens,
                              "num_shards": len(index.shards), "verify": verify, "shards_needed": needed}))
            return 0
        traffic_bytes_per_s, bound_tokens_per_s = memcpy_tokens_per_s(dim)

        results: dict[str, dict | None] = {}
        for workers in (0, 1, 2):
            results[f"shardstream_w{workers}"] = bench_shardstream(root, args.max_tokens, workers, args.repeats)
        results["shardstream_w2_tensors"] = bench_tensor_handover(root, args.max_tokens, 2, args.repeats)
        for block in [int(b) for b in args.block_sizes.split(",") if b.strip()]:
            results[f"shardstream_w2_block{block}"] = bench_block_size(root, args.max_tokens, 2, block, args.repeats)

        peer_ids = np.random.default_rng(0).choice(index.num_sequences, min(args.peer_sequences, index.num_sequences),
                                                   replace=False)
        json_path, jsonl_path = tmp / "peer.json", tmp / "peer.jsonl"
        export_json(root, np.sort(peer_ids), json_path, jsonl_path)
        results["seed_json_pad_sequence"] = bench_seed_style(json_path, args.peer_batch, args.repeats)
        results["hf_datasets"] = bench_hf_datasets(jsonl_path, args.peer_batch, args.repeats, tmp / "hf_cache")
        plan_s = plan_seconds(root, args.max_tokens)

    print(f"\ncorpus: {index.num_sequences} sequences, {index.num_tokens} tokens, dim {dim}, "
          f"median length {np.median(lengths):.0f}, p99 {np.percentile(lengths, 99):.0f}; "
          f"max_tokens {args.max_tokens}; JSON peers: {len(peer_ids)} sequences, batch {args.peer_batch}; "
          f"{os.cpu_count()} CPUs; medians of {args.repeats} runs")
    print(f"memcpy bound: {traffic_bytes_per_s / 1e9:.2f} GB/s read+write = {bound_tokens_per_s / 1e6:.1f} M tokens/s")
    print(f"{'pipeline':<26}{'real tokens/s':>16}{'% of memcpy':>13}{'pad %':>8}{'first batch s':>15}")
    for name, r in results.items():
        if r is None:
            skipped = "skipped (pip install -e '.[bench]')"
            print(f"{name:<26}{skipped:>52}")
            continue
        print(f"{name:<26}{r['real_tokens_per_s'] / 1e6:>14.2f} M{100 * r['real_tokens_per_s'] / bound_tokens_per_s:>12.1f}%"
              f"{100 * r['pad_fraction']:>7.1f}%{r['first_batch_s']:>15.3f}")
    best = max(results[f"shardstream_w{w}"]["real_tokens_per_s"] for w in (0, 1, 2))
    ratios = {"best_shardstream_vs_memcpy": best / bound_tokens_per_s,
              "w2_ring_vs_w2_tensors": results["shardstream_w2"]["real_tokens_per_s"]
              / results["shardstream_w2_tensors"]["real_tokens_per_s"],
              "w2_vs_w0": results["shardstream_w2"]["real_tokens_per_s"] / results["shardstream_w0"]["real_tokens_per_s"],
              "best_shardstream_vs_seed": best / results["seed_json_pad_sequence"]["real_tokens_per_s"]}
    if results["hf_datasets"] is not None:
        ratios["best_shardstream_vs_hf"] = best / results["hf_datasets"]["real_tokens_per_s"]
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"stream built and first batch planned: {plan_s:.3f} s (bench_plan.py: the same at 100 M sequences)")
    print_verify(verify, needed, len(index.shards))
    print(json.dumps({
        "benchmark": "loader",
        "num_sequences": index.num_sequences,
        "num_tokens": index.num_tokens,
        "dim": dim,
        "max_tokens": args.max_tokens,
        "cpus": os.cpu_count(),
        "memcpy_bytes_per_s": traffic_bytes_per_s,
        "memcpy_tokens_per_s": bound_tokens_per_s,
        "results": results,
        "ratios": ratios,
        "plan_first_batch_s": plan_s,
        "verify": verify,
        "shards_needed": needed,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
