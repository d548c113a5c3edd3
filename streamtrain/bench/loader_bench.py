"""Loader throughput beside its peers and its bound, in one run: ShardStream (0 and 2 workers) vs seed-style
loading (JSON-loaded tensors, random batches, pad_sequence) vs Hugging Face `datasets` (when installed),
against this machine's memcpy bandwidth.

Real (non-pad) tokens/s over whole epochs, medians of the repeats, counted after the first batch (the rate
a training loop sees); the time to the first batch (loading, planning, worker start) separately, and the
rate over the whole epoch from the start (`loader_epoch_real_tokens_per_s`).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from streamtrain.data import ShardStream, make_loader
from streamtrain.data.reader import ShardReader
from streamtrain.dataset import read_index

__all__ = ["memcpy_tokens_per_s", "measure_pipeline", "shardstream_batches", "export_json", "seed_style_batches",
           "hf_datasets_batches", "measure_loader"]


def memcpy_tokens_per_s(dim: int, buffer_bytes: int = 256 << 20, repeats: int = 5) -> tuple[float, float]:
    """(bytes/s of read + write traffic, tokens/s) of np.copyto on a buffer far larger than the caches: a
    token copied from the map into a batch moves 2 * dim * 4 bytes, so no loader can pass this rate."""
    src = np.random.default_rng(0).standard_normal(buffer_bytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    traffic_bytes_per_s = 2 * src.nbytes / statistics.median(times)
    return traffic_bytes_per_s, traffic_bytes_per_s / (2 * dim * 4)


def measure_pipeline(make_iter, repeats: int) -> dict:
    """Run `make_iter(r)` (yielding (x, lengths)) to exhaustion `repeats` times; medians over the runs."""
    rates, epoch_rates, firsts, pads = [], [], [], []
    for r in range(repeats):
        real = padded = first_real = 0
        t0 = time.perf_counter()
        first_at = None
        for x, lengths in make_iter(r):
            padded += x.shape[0] * x.shape[1]
            n = int(lengths.sum())
            real += n
            if first_at is None:
                first_at, first_real = time.perf_counter(), n
        end = time.perf_counter()
        if first_at is None:
            continue
        rates.append((real - first_real) / (end - first_at) if end > first_at else float("nan"))
        epoch_rates.append(real / (end - t0))
        firsts.append(first_at - t0)
        pads.append(1 - real / padded if padded else 0.0)
    return {
        "real_tokens_per_s": statistics.median(rates),
        "epoch_real_tokens_per_s": statistics.median(epoch_rates),  # from the start: loading, planning included
        "pad_fraction": statistics.median(pads),
        "first_batch_s": statistics.median(firsts),
        "runs": repeats,
    }


def shardstream_batches(root: Path, max_tokens: int, num_workers: int):
    def run(r):
        ds = ShardStream(root, max_tokens=max_tokens, seed=0)
        ds.set_epoch(r)
        for batch in make_loader(ds, num_workers=num_workers, persistent_workers=False):
            yield batch.x, batch.lengths

    return run


def export_json(root: Path, ids: np.ndarray, json_path: Path, jsonl_path: Path) -> None:
    """The sequences `ids` of the dataset as one JSON array and as JSON Lines (the peers' inputs)."""
    reader = ShardReader(root)
    seqs = [reader.sequence(int(i)).tolist() for i in ids]
    json_path.write_text(json.dumps(seqs))
    with open(jsonl_path, "w") as f:
        for s in seqs:
            f.write(json.dumps({"sequence": s}) + "\n")


def seed_style_batches(json_path: Path, batch_size: int):
    from torch.nn.utils.rnn import pad_sequence

    def run(r):
        with open(json_path) as f:
            tensors = [torch.tensor(s, dtype=torch.float32) for s in json.load(f)]
        order = torch.randperm(len(tensors), generator=torch.Generator().manual_seed(r))
        for k in range(0, len(order), batch_size):
            members = [tensors[i] for i in order[k : k + batch_size].tolist()]
            yield pad_sequence(members, batch_first=True), torch.tensor([len(m) for m in members])

    return run


def hf_datasets_batches(jsonl_path: Path, batch_size: int, cache_dir: Path):
    """The Hugging Face `datasets` peer, or None when it is not installed (`pip install 'streamtrain[bench]'`)."""
    try:
        import datasets
    except ImportError:
        return None
    from torch.utils.data import DataLoader

    datasets.disable_progress_bars()

    def collate(rows):
        members = [torch.from_numpy(np.asarray(row["sequence"], dtype=np.float32)) for row in rows]
        return torch.nn.utils.rnn.pad_sequence(members, batch_first=True), torch.tensor([len(m) for m in members])

    def run(r):
        ds = datasets.load_dataset("json", data_files=str(jsonl_path), split="train", cache_dir=str(cache_dir / f"r{r}"))
        ds = ds.with_format("numpy")
        yield from DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=collate,
                              generator=torch.Generator().manual_seed(r))

    return run


def measure_loader(root: Path, work: Path, *, max_tokens: int, repeats: int, peer_sequences: int,
                   peer_batch: int = 16, workers: tuple[int, ...] = (0, 2), memcpy_bytes: int = 256 << 20) -> dict:
    index = read_index(root)
    traffic_bytes_per_s, bound_tokens_per_s = memcpy_tokens_per_s(index.dim, memcpy_bytes)
    ShardStream(root, max_tokens=max_tokens)  # checksums recorded: the runs below see what a later fit sees
    ours = {w: measure_pipeline(shardstream_batches(root, max_tokens, w), repeats) for w in workers}
    best_w = max(ours, key=lambda w: ours[w]["real_tokens_per_s"])
    ids = np.sort(np.random.default_rng(0).choice(index.num_sequences, min(peer_sequences, index.num_sequences),
                                                  replace=False))
    json_path, jsonl_path = work / "peer.json", work / "peer.jsonl"
    export_json(root, ids, json_path, jsonl_path)
    seed = measure_pipeline(seed_style_batches(json_path, peer_batch), repeats)
    hf_run = hf_datasets_batches(jsonl_path, peer_batch, work / "hf-cache")
    hf = measure_pipeline(hf_run, repeats) if hf_run is not None else None
    best = ours[best_w]
    figures = {
        "loader_real_tokens_per_s": best["real_tokens_per_s"],
        "loader_workers": best_w,
        "loader_pad_fraction": best["pad_fraction"],
        "loader_first_batch_s": best["first_batch_s"],
        "loader_epoch_real_tokens_per_s": best["epoch_real_tokens_per_s"],
        **{f"loader_w{w}_real_tokens_per_s": r["real_tokens_per_s"] for w, r in ours.items()},
        "seed_loader_real_tokens_per_s": seed["real_tokens_per_s"],
        "seed_loader_pad_fraction": seed["pad_fraction"],
        "hf_loader_real_tokens_per_s": None if hf is None else hf["real_tokens_per_s"],
        "hf_loader_pad_fraction": None if hf is None else hf["pad_fraction"],
        "memcpy_bytes_per_s": traffic_bytes_per_s,
        "memcpy_loader_real_tokens_per_s": bound_tokens_per_s,
        "loader_vs_memcpy": best["real_tokens_per_s"] / bound_tokens_per_s,
        "loader_vs_seed": best["real_tokens_per_s"] / seed["real_tokens_per_s"],
        "loader_vs_hf": None if hf is None else best["real_tokens_per_s"] / hf["real_tokens_per_s"],
        "loader_max_tokens": max_tokens,
        "loader_peer_sequences": len(ids),
        "loader_repeats": repeats,
    }
    return figures
