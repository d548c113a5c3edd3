"""What `fit` trains and validates on: turns --data / --synthetic / --val-data / --val-fraction into dataset
folders and id lists, converting a raw JSON/JSONL folder once into a cache and checking shards up front.

The validation split by --val-fraction is `bucketing.split_ids` with a fixed seed: the same sequences are
held out whatever --seed, the number of ranks or the shuffle.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamtrain.dataset import Index, is_dataset
from streamtrain.storage.location import is_remote
from streamtrain.storage.remote import open_index
from streamtrain.dataset.checksums import index_files, verify_files
from streamtrain.errors import DataError, UserError
from streamtrain.train.config import RunConfig, parse_synthetic, parse_weights

__all__ = ["TrainData", "prepare_data", "resolve_dataset", "make_stream_and_loader", "mixed_index"]

SYNTHETIC_DIM = 28


@dataclass
class TrainData:
    # one dataset folder, or several with their weights (mixed by ShardStream: each source's share of an
    # epoch's real tokens)
    train_root: Path | str | list[tuple[Path | str, float]]  # str: a dataset URL
    train_ids: np.ndarray | None  # None: every sequence
    val_root: Path | str | None  # None: no validation
    val_ids: np.ndarray | None
    index: Index  # of train_root (with several sources: the first's, with the mix's mean/std); its
    # mean/std standardize inputs and targets
    val_index: Index | None = None  # of val_root (the same object as index when the split is by id)


def _convert_cached(raw: Path, cache_root: Path, is_main: bool) -> Path:
    """Convert a raw JSON/JSONL folder into cache_root/<hash of its path>. convert is incremental, so an
    unchanged folder is not parsed again and changed or new files are (convert's own change detection)."""
    out = cache_root / hashlib.sha256(str(raw.resolve()).encode()).hexdigest()[:16]
    if is_main:
        from streamtrain.convert import convert

        try:
            convert([raw], out)
        except UserError as e:
            raise type(e)(f"--data {raw}: {e}") from None
    return out


def resolve_dataset(path: str, flag: str, cache_root: Path, is_main: bool) -> Path | str:
    """A dataset folder or URL as is; a folder of raw JSON/JSONL converted (once) into the run's cache."""
    if is_remote(path):
        return path  # index.json and the lengths come through the shard cache (`storage.cache`)
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} {p}: no such file or folder")
    if is_dataset(p):
        return p
    if p.is_dir():
        return _convert_cached(p, cache_root, is_main)
    raise UserError(f"{flag} {p}: expected a dataset folder or a folder of JSON/JSONL files")


def _verify(index: Index, root) -> None:
    """Hash the files of `index` not verified before, on the main rank before the others start: they then
    find the versions in the record cache instead of all hashing the same files at once. (A remote dataset's
    files are checked as they are downloaded.)"""
    if not is_remote(str(root)):
        verify_files(index_files(index))


def prepare_data(cfg: RunConfig, run_dir: Path, is_main: bool) -> TrainData:
    """Resolve the training and validation data. Only the main rank writes (synthetic data, conversion);
    the caller makes the other ranks wait for it, then calls this again with is_main=False."""
    d = cfg.data
    cache_root = run_dir.parent / ".streamtrain-cache"
    if d.synthetic is not None:
        num_sequences, length = parse_synthetic(d.synthetic)
        train_root = run_dir / "synthetic"
        if is_main:
            from streamtrain.dataset.synthetic import write_synthetic

            write_synthetic(train_root, num_sequences, length, dim=SYNTHETIC_DIM, seed=cfg.train.seed)
    else:
        roots = [resolve_dataset(p, "--data", cache_root, is_main) for p in d.sources()]
    if d.synthetic is not None or len(roots) == 1:
        train_root = train_root if d.synthetic is not None else roots[0]
        index = open_index(train_root, d.cache_dir)  # shard sizes (with verify, checksums) are checked by each ShardStream
        if d.verify and is_main:
            _verify(index, train_root)
        if index.num_sequences == 0:
            raise DataError(f"{train_root}: the dataset holds no sequences")
    else:
        indexes = [open_index(r, d.cache_dir) for r in roots]
        for r, ix in zip(roots, indexes):
            if d.verify and is_main:
                _verify(ix, r)
            if ix.num_sequences == 0:
                raise DataError(f"{r}: the dataset holds no sequences")
            if ix.dim != indexes[0].dim:
                raise UserError(f"--data {r}: dim {ix.dim} differs from {roots[0]}'s {indexes[0].dim}")
        weights = (parse_weights(d.weights, len(roots)) if d.weights is not None
                   else [float(ix.num_tokens) for ix in indexes])
        train_root = list(zip(roots, weights))
        index = mixed_index(indexes, weights)

    train_ids = val_ids = None
    val_root = val_index = None
    if d.val_data is not None:
        val_root = resolve_dataset(d.val_data, "--val-data", cache_root, is_main)
        val_index = open_index(val_root, d.cache_dir)
        if val_index.dim != index.dim:
            raise UserError(f"--val-data {val_root}: dim {val_index.dim} differs from the training data's {index.dim}")
        if d.verify and is_main:
            _verify(val_index, val_root)
    elif d.val_fraction > 0:
        from streamtrain.data.bucketing import split_ids

        # seed 0, not --seed: the held-out set stays the same when only the training seed changes
        train_ids, val_ids = split_ids(index.num_sequences, d.val_fraction, seed=0)
        if len(val_ids) == 0 or len(train_ids) == 0:
            raise UserError(
                f"--val-fraction {d.val_fraction} leaves {len(train_ids)} training and {len(val_ids)} validation "
                f"sequences out of {index.num_sequences}; pick a fraction that leaves both non-empty"
            )
        val_root, val_index = train_root, index
    if not isinstance(train_root, list) and not is_remote(str(train_root)):
        train_root = Path(train_root)
    if val_root is not None and not is_remote(str(val_root)):
        val_root = Path(val_root)
    return TrainData(train_root, train_ids, val_root, val_ids, index, val_index)


def mixed_index(indexes: list[Index], weights: list[float]) -> Index:
    """The first index with the mean and std of the mix: a source's share of the epoch's tokens is its
    weight's share, so the mix's moments are the weighted sums of the sources' (one standardization for
    every source, the statistics of the stream the model is trained on)."""
    p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    means = np.stack([ix.mean for ix in indexes])
    second = np.stack([ix.std ** 2 + ix.mean ** 2 for ix in indexes])
    mean = p @ means
    std = np.sqrt(np.maximum(p @ second - mean ** 2, 0.0))
    return dataclasses.replace(indexes[0], mean=mean, std=std)


def make_stream_and_loader(cfg: RunConfig, root: Path | list[tuple[Path, float]], ids: np.ndarray | None, shuffle: bool, rank: int,
                           world_size: int, device, max_shapes: int | None = None):
    """The ShardStream of `root` (restricted to `ids`) with the run's batching flags, and its loader (no
    workers on a CPU, where the model's threads use every core; 2 on CUDA, with pinned memory)."""
    from streamtrain.data import ShardStream, bucketing, make_loader

    d = cfg.data
    kwargs: dict[str, Any] = {"max_tokens": d.batch_tokens, "seed": cfg.train.seed, "shuffle": shuffle,
                              "rank": rank, "world_size": world_size, "verify": d.verify,
                              "window": "auto" if d.window is None else d.window}
    if d.batch is not None:
        kwargs["max_sequences"] = d.batch
    if d.max_len is not None:
        longest = bucketing.longest_row(d.batch_tokens, bucketing.DEFAULT_PAD_MULTIPLE)
        if d.max_len > longest:
            raise UserError(
                f"--max-len {d.max_len} does not fit a micro-batch: --batch-tokens {d.batch_tokens} holds rows "
                f"of at most {longest} vectors (a multiple of {bucketing.DEFAULT_PAD_MULTIPLE}); lower --max-len "
                "or raise --batch-tokens"
            )
        kwargs["max_len"] = d.max_len
    if ids is not None:
        kwargs["ids"] = ids
    if d.cache_dir is not None:
        kwargs["cache_dir"] = d.cache_dir
    if d.cache_limit is not None:
        kwargs["cache_limit"] = d.cache_limit
    if d.prefetch_threads is not None:
        kwargs["prefetch_threads"] = d.prefetch_threads
    if max_shapes is not None:
        kwargs["max_shapes"] = max_shapes
    stream = ShardStream([(str(r), w) for r, w in root] if isinstance(root, list) else str(root), **kwargs)
    num_workers = d.num_workers if d.num_workers is not None else (0 if device.type == "cpu" else 2)
    return stream, make_loader(stream, num_workers=num_workers, pin_memory=device.type == "cuda")
