"""`ShardStream`: an IterableDataset of length-bucketed, padded batches for one rank, with a position for
exact resume; the order is `plan.EpochPlan`'s (batches formed inside windows of shards), dealt to ranks and
then to DataLoader workers. The Loader that moves the position lives in `loader`.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from streamtrain.data import bucketing, needs
from streamtrain.data.batch import Batch, assemble_batch
from streamtrain.data.buffers import BatchBuffers
from streamtrain.data.bounds import histogram_bounds
from streamtrain.data.plan import BatchRows, EpochPlan, bucket_lookup, unit_bucket_counts
from streamtrain.data.reader import ShardReader
from streamtrain.data.sources import SourceSet, check_shard_files, open_cache, parse_sources, stored_histogram
from streamtrain.data.transport import (
    BATCHES_PER_MESSAGE,
    BatchRing,
    SlotBatch,
    SlotGroup,
    shared_tensor,
)
from streamtrain.dataset import Index, read_index
from streamtrain.dataset.checksums import index_files, verify_files
from streamtrain.errors import UserError
from streamtrain.storage.cache import ShardCache

__all__ = ["ShardStream", "DEFAULT_WINDOW_BYTES", "auto_window"]

# Shard bytes per window of the epoch plan (window="auto"): a rank reads the shards of one window (and of
# the one before, for the few items carried over) at a time. A window must hold enough items per length
# bucket to fill its batches: on the real instruction corpus in 2 MB shards, 8 shards per window (~110 k
# tokens) left batches 29% full against an 8192-token budget, one window over all 2 M tokens 79%
# (benchmarks/bench_plan.py). 256 MB is ~2.3 M tokens of 28-float vectors: 4 shards of a default convert.
DEFAULT_WINDOW_BYTES = 256 << 20


def auto_window(indexes: Sequence[Index], window_bytes: int = DEFAULT_WINDOW_BYTES) -> int:
    """Shards per window so that a window holds about `window_bytes` of shards (at least one shard)."""
    sizes = [s.bytes for ix in indexes for s in ix.shards]
    if not sizes:
        return 1
    return max(1, int(round(window_bytes / max(1.0, float(np.mean(sizes))))))


class ShardStream(IterableDataset):
    """Token-budget batches from one dataset folder, or several mixed by weight, for one rank.

    root: a dataset folder, or a list of (folder, weight) to mix (see `sources`: each epoch takes from
        each its weight's share of the epoch's tokens; ids are then positions in the concatenation).
    max_tokens: bound on padded tokens B * T of every batch.
    seed, shuffle: the order is a pure function of (seed, epoch, world_size); shuffle=False gives a fixed
        order (dataset order, buckets ascending within a window), for evaluation.
    rank, world_size: this process's share of every epoch.
    max_len: longer sequences become windows overlapping by one vector (default: max_tokens rounded down
        to pad_multiple, the longest row a batch can hold).
    drop_last: remainder policy when the batch count is not a multiple of world_size: False repeats fewer
        than world_size batches from the start of the epoch's list so every rank gets
        ceil(num_batches / world_size); True drops the last num_batches % world_size.
    ids: optional global ids to use (one source only; e.g. a train/val split from `bucketing.split_ids`).
    pad_multiple, max_shapes: padded T is a multiple of pad_multiple, from at most max_shapes values
        (`bucketing.bucket_bounds` over the length histogram, stored in index.json by convert).
    max_sequences: at most this many rows per batch (a fixed batch size B of similar-length sequences).
    window, span: shards per window of the epoch plan ("auto": about DEFAULT_WINDOW_BYTES of shards; None:
        the whole dataset as one window) and how many consecutive windows a batch may read (`plan.EpochPlan`).
    epoch_tokens: with several sources, real tokens per epoch (default: all sources' tokens together).
    verify: check the sha256 of the lengths file and of every shard against index.json before any of its
        rows is used, in every process (`dataset.checksums`); False for storage you trust.
    max_open_shards: most shards memory-mapped at once per process (`reader.DEFAULT_MAX_OPEN_SHARDS`).
    cache_dir, cache_limit, storage_options: for a source given as a URL (s3://bucket/prefix, gs://...):
        the node-local cache folder (default: the user cache's remote/), its bound in bytes or as "20GB"
        (default: none), and the storage settings (`storage.location`, {KEY: VALUE}). The plan is the same
        as for a local copy of the dataset; only where the shard bytes come from differs (`storage.cache`).
    prefetch_threads: downloads in flight per process for a URL source (default: one per two cores, 1 to 4,
        `storage.cache.default_prefetch_threads`).

    Only index.json and the lengths are read here (and, with verify, shards hashed whose file version was
    not verified before); planning touches no shard and costs one pass over the lengths; shards are mapped
    lazily in the process that iterates, so the object pickles small into DataLoader workers. With
    world_size 1 and one source, every item (a sequence, or each window of a long one) is yielded exactly
    once per epoch.
    """

    def __init__(
        self,
        root: str | os.PathLike | Sequence[tuple[str | os.PathLike, float]],
        max_tokens: int = 8192,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        *,
        max_len: int | None = None,
        drop_last: bool = False,
        ids: np.ndarray | None = None,
        pad_multiple: int = bucketing.DEFAULT_PAD_MULTIPLE,
        max_shapes: int = bucketing.DEFAULT_MAX_SHAPES,
        max_sequences: int | None = None,
        window: int | str | None = "auto",
        span: int = 2,
        epoch_tokens: int | None = None,
        verify: bool = True,
        max_open_shards: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | str | None = None,
        storage_options: dict[str, str] | None = None,
        prefetch_threads: int | None = None,
    ):
        super().__init__()
        if pad_multiple < 1:
            raise UserError(f"pad_multiple must be >= 1, got {pad_multiple}")
        if max_sequences is not None and max_sequences < 1:
            raise UserError(f"max_sequences must be >= 1, got {max_sequences}")
        longest = bucketing.longest_row(max_tokens, pad_multiple)
        if longest < 2:
            raise UserError(
                f"max_tokens={max_tokens} is too small: it must be >= max(2, pad_multiple={pad_multiple}) "
                "so that a batch holds one padded row"
            )
        if max_len is None:
            max_len = longest
        if not 2 <= max_len <= longest:
            raise UserError(
                f"max_len={max_len} must be in [2, {longest}] (max_tokens={max_tokens} rounded down to a multiple "
                f"of pad_multiple={pad_multiple}, so that one padded row fits a batch)"
            )
        if int(seed) < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank={rank} must be in [0, world_size={world_size})")
        if max_open_shards is not None and max_open_shards < 1:
            raise UserError(f"max_open_shards must be >= 1, got {max_open_shards}")
        if window != "auto" and window is not None and (not isinstance(window, int) or window < 1):
            raise UserError(f"window must be >= 1 shard, \"auto\" or None (one window), got {window!r}")
        if span < 1:
            raise UserError(f"span must be >= 1 window, got {span}")
        roots, weights = parse_sources(root)
        if prefetch_threads is not None and prefetch_threads < 1:
            raise UserError(f"prefetch_threads must be >= 1, got {prefetch_threads}")
        self.caches: list[ShardCache | None] = [open_cache(r, cache_dir, cache_limit, storage_options, prefetch_threads)
                                                for r in roots]
        self.indexes: list[Index] = [c.sync() if c is not None else read_index(r) for r, c in zip(roots, self.caches)]
        self.index = self.indexes[0]
        self.dim = self.index.dim
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.max_len = int(max_len)
        self.drop_last = bool(drop_last)
        self.pad_multiple = int(pad_multiple)
        self.max_sequences = None if max_sequences is None else int(max_sequences)
        if window == "auto":
            window = auto_window(self.indexes)
        self.window = None if window is None else int(window)
        self.span = int(span)
        self.epoch_tokens = None if epoch_tokens is None else int(epoch_tokens)
        self.verify = bool(verify)
        self.max_open_shards = None if max_open_shards is None else int(max_open_shards)
        for ix, cache in zip(self.indexes, self.caches):
            if cache is None:  # a cache checks each download's size and sha256 instead
                check_shard_files(ix)
        if ids is not None:
            ids = np.unique(np.asarray(ids, dtype=np.int64))
            if len(ids) and (ids[0] < 0 or ids[-1] >= self.index.num_sequences):
                raise UserError(f"ids must be in [0, {self.index.num_sequences}), got {ids[0]}..{ids[-1]}")
        self.sources = SourceSet(self.indexes, weights, ids, self.verify)
        if self.verify:
            by_source: dict[int, list[int]] = {}
            for shard in np.unique(self.sources.unit_shards).tolist():
                s, _, k = self.sources.shard_info(shard)
                by_source.setdefault(s, []).append(k)
            for s, ix in enumerate(self.indexes):
                if self.caches[s] is None:
                    verify_files(index_files(ix, by_source.get(s, [])))

        self._item_values, self._item_counts = self._item_histogram()
        self.bounds = histogram_bounds(self._item_values, self._item_counts, self.pad_multiple, max_shapes)
        self._lookup = bucket_lookup(self.bounds, self.pad_multiple)
        self._unit_counts, self._unit_tokens = unit_bucket_counts(
            self.sources.lengths_of, self.sources.unit_starts, self.sources.unit_stops, self._lookup,
            self.pad_multiple, self.max_len,
        )
        self._num_items = int(self._unit_counts.sum())
        self._epoch = 0
        self._batches_done = 0
        # (epoch, first batch) of the iteration about to start, read by DataLoader workers when they
        # (re)start; shared memory so that persistent workers see positions set in the main process
        self._iteration_start = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._readers: list[ShardReader | None] = [None] * len(self.indexes)
        self._buffers: BatchBuffers | None = None  # made on first use, in the process that builds batches
        self._plans: OrderedDict[int, EpochPlan] = OrderedDict()
        # set by a Loader before it starts workers; None: workers hand batches over as tensors
        self.ring: BatchRing | None = None
        needs.check_cache_limits(self.caches, self.sources, self.plan, self.span, self.window)

    def _item_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """The histogram of the items (windows of at most max_len) an epoch plans: each source's length
        histogram (index.json's, else computed from the lengths), weighted by its share of an epoch."""
        parts = []
        for s, src in enumerate(self.sources.sources):
            stored = src.index.extra.get("length_histogram")
            if src.ids is None and stored is not None:
                values, counts = stored_histogram(src.index, stored)
            else:
                lengths = self.sources.lengths(s)
                values, counts = bucketing.length_histogram(lengths if src.ids is None else lengths[src.ids])
            parts.append(bucketing.item_length_histogram(values, counts, self.max_len))
        if len(parts) == 1:
            return parts[0]
        tokens = np.array([float((v * c).sum()) for v, c in parts])
        weights = np.array([src.weight for src in self.sources.sources])
        total = float(tokens.sum()) if self.epoch_tokens is None else float(self.epoch_tokens)
        scale = np.where(tokens > 0, total * weights / weights.sum() / np.maximum(tokens, 1.0), 0.0)
        values = np.concatenate([v for v, _ in parts])
        counts = np.concatenate([c * f for (_, c), f in zip(parts, scale)])
        uniq, inverse = np.unique(values, return_inverse=True)
        return uniq, np.bincount(inverse, weights=counts)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = [None] * len(self.indexes)
        state["_plans"] = OrderedDict()
        state["_buffers"] = None
        return state

    @property
    def items(self) -> bucketing.Items:
        """Every item of the sources' units, in dataset order (int64 arrays for the whole dataset: for
        inspection and tests; planning never builds them)."""
        parts = [self.sources.rows_of(a, b, self.max_len)
                 for a, b in zip(self.sources.unit_starts.tolist(), self.sources.unit_stops.tolist())]
        if not parts:
            z = np.zeros(0, np.int64)
            return bucketing.Items(z, z, z)
        return bucketing.Items(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "offsets", "lengths")))

    def item_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(item lengths, how many items of each an epoch plans), the buckets' source."""
        return self._item_values, self._item_counts

    @property
    def num_items(self) -> int:
        """Items (sequences, or windows of long ones) of the sources' units: an epoch's count without mixing."""
        return self._num_items

    # -- sizes and position ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_batches()

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches this rank yields in `epoch` (default: the position's), the same on every rank."""
        return bucketing.dealt_count(self.num_global_batches(epoch), self.world_size, self.drop_last)

    def num_global_batches(self, epoch: int | None = None) -> int:
        """Batches in an epoch's plan before dealing to ranks."""
        return self.plan(self._epoch if epoch is None else epoch).num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_done(self) -> int:
        """Rank-local number of the next batch of `epoch` to yield."""
        return self._batches_done

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch; a no-op when the position already is in `epoch`."""
        if int(epoch) != self.epoch:
            self.set_position(int(epoch), 0)

    def set_position(self, epoch: int, batches_done: int, publish: bool = True) -> None:
        n = self.num_batches(epoch)
        if batches_done >= n > 0:
            epoch, batches_done = epoch + 1, 0
        self._epoch, self._batches_done = epoch, batches_done
        if publish:
            self.publish_position()

    def publish_position(self) -> None:
        self._iteration_start[0] = self._epoch
        self._iteration_start[1] = self._batches_done

    # -- plan -----------------------------------------------------------------------------------------

    def plan(self, epoch: int) -> EpochPlan:
        """The global batch list of `epoch` (the last few epochs asked are kept)."""
        plan = self._plans.get(epoch)
        if plan is not None:
            return plan
        src = self.sources
        units = src.epoch_units(self.seed, epoch, self._unit_tokens, self.max_len, self.epoch_tokens)
        counts = np.zeros((len(units.starts), len(self.bounds)), np.int64)
        tokens = np.zeros(len(units.starts), np.int64)
        whole = units.base >= 0
        counts[whole], tokens[whole] = self._unit_counts[units.base[whole]], self._unit_tokens[units.base[whole]]
        cut = np.flatnonzero(~whole)
        if len(cut):
            counts[cut], tokens[cut] = unit_bucket_counts(src.lengths_of, units.starts[cut], units.stops[cut],
                                                          self._lookup, self.pad_multiple, self.max_len)
        # a partial of the SourceSet, not a closure over self: a plan kept in self._plans must not make the
        # stream a reference cycle (its open maps would then outlive it until a gc run, and forked
        # DataLoader workers would inherit them)
        plan = EpochPlan(
            functools.partial(src.rows_of, max_len=self.max_len), units.starts, units.stops, counts, tokens, self.bounds,
            self.max_tokens, self.seed, epoch, shuffle=self.shuffle, window=self.window, span=self.span,
            pad_multiple=self.pad_multiple, max_sequences=self.max_sequences, tags=units.shards,
        )
        self._plans[epoch] = plan
        while len(self._plans) > 2:
            self._plans.popitem(last=False)
        return plan

    def rank_batches(self, epoch: int | None = None) -> np.ndarray:
        """Epoch batch numbers (into `plan(epoch)`) this rank yields, in order."""
        n = self.num_global_batches(epoch)
        return bucketing.deal_batches(n, self.rank, self.world_size, self.drop_last)

    def shards_needed(self, epoch: int | None = None, start: int = 0) -> list[tuple[int, int]]:
        """The shards this rank reads from its batch `start` of `epoch` on, in the order first needed:
        [(global shard number, the rank-local batch from which it is needed)] (a shard's global number
        counts the shards of earlier sources first; `sources.shard_info` resolves it). A shard not listed
        is not read again this epoch."""
        epoch = self._epoch if epoch is None else epoch
        return needs.shards_needed(self.plan(epoch), self.rank_batches(epoch), start)

    # -- reading --------------------------------------------------------------------------------------

    def reader(self, source: int = 0) -> ShardReader:
        """The ShardReader of `source` in this process."""
        if self._readers[source] is None:
            cache = self.caches[source]
            self._readers[source] = ShardReader(self.indexes[source], verify=self.verify,
                                                max_open_shards=self.max_open_shards,
                                                fetch=None if cache is None else cache.fetch)
        return self._readers[source]

    def _gather(self, out: np.ndarray, ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                zero_padding: bool) -> None:
        """Fill out[:len(ids)] from the sources; rows are grouped by source (see `_rows`)."""
        if not self.sources.mixed:  # one source: its ids are the global ids
            self.reader(0).gather(out, ids, offsets, lengths, zero_padding=zero_padding)
            return
        for s, sel in self.sources.split_ids(ids):
            a, b = int(sel[0]), int(sel[-1]) + 1
            self.reader(s).gather(out[a:b], self.sources.to_local(s, ids[a:b]), offsets[a:b], lengths[a:b],
                                  zero_padding=zero_padding)

    def _rows(self, rows: BatchRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int64 (ids, offsets, lengths) of a batch (new arrays: they become the Batch's); with several
        sources, grouped by source (stable), so each source fills one block of rows."""
        ids, offsets, lengths = (np.array(a, dtype=np.int64) for a in (rows.ids, rows.offsets, rows.lengths))
        if self.sources.mixed and len(ids):
            order = np.argsort(self.sources.source_of_ids(ids), kind="stable")
            ids, offsets, lengths = ids[order], offsets[order], lengths[order]
        return ids, offsets, lengths

    def make_batch(self, rows: BatchRows, shared: bool = False) -> Batch:
        """Copy a batch's rows into one zero-padded (B, T, D) array; `shared`: allocate it in shared memory so
        a DataLoader worker hands it to the main process without another copy."""
        ids, offsets, lengths = self._rows(rows)
        padded_len = rows.padded_len
        shape = (len(ids), padded_len, self.dim)
        if shared:
            x = shared_tensor(int(np.prod(shape)), torch.float32).view(shape)
            out = x.numpy()
            dirty = True  # padding zeroed explicitly, not left to how the shared-memory allocator hands out pages
        else:
            if self._buffers is None:
                self._buffers = BatchBuffers(self.max_tokens * self.dim)
            out, dirty = self._buffers.take(shape)
            x = torch.from_numpy(out)
        self._gather(out, ids, offsets, lengths, zero_padding=dirty)
        return assemble_batch(x, lengths, ids, offsets)

    def _slot_batch(self, ring: BatchRing, worker: int, generation: int, rows: BatchRows) -> SlotBatch | None:
        """Build a batch in a free slot of `ring`; None when the iteration ended while waiting for one."""
        claimed = ring.claim(worker, generation)
        if claimed is None:
            return None
        slot, seq = claimed
        ids, offsets, lengths = self._rows(rows)
        out = ring.slot(worker, slot, (len(ids), rows.padded_len, self.dim))
        # the slot holds an earlier batch: the rows are overwritten and the padding zeroed, each once
        self._gather(out, ids, offsets, lengths, zero_padding=True)
        return SlotBatch(ring.token, worker, slot, seq, rows.padded_len, self.dim, lengths, ids, offsets)

    def __iter__(self):
        # Not a generator function: the start is read now, when DataLoader (re)starts the worker, not at
        # the first batch, by which time the main process may have moved on.
        info = get_worker_info()
        if info is None:
            # in this process the position itself is current (a Loader moves it without publishing)
            worker, num_workers = 0, 1
            epoch, start = self._epoch, self._batches_done
        else:
            worker, num_workers = info.id, info.num_workers
            epoch, start = (int(v) for v in self._iteration_start.tolist())
        if info is not None and self.ring is not None:
            return self._slot_batches(self.ring, epoch, start, worker, num_workers)
        return self._batches(epoch, start, worker, num_workers, shared=info is not None)

    def _worker_blocks(self, epoch: int, start: int, worker: int, num_workers: int, block: int):
        """This worker's share of the rank's stream from batch `start` on: blocks of up to `block`
        consecutive batches (lists of BatchRows), block j of the iteration to worker
        j % num_workers. DataLoader hands worker outputs over round-robin in order, so the main process
        sees the same sequence as from one process."""
        plan = self.plan(epoch)
        mine = self.rank_batches(epoch)
        remote = any(c is not None for c in self.caches)
        needed = self.shards_needed(epoch, start) if remote else []
        starts = plan.window_starts()
        window = -1
        for first in range(start + worker * block, len(mine), num_workers * block):
            if remote:
                j = int(np.searchsorted(starts, mine[first], side="right") - 1)
                if j != window:
                    window = j
                    needs.publish_needs(self.caches, self._readers, self.sources, epoch, plan, j,
                                        [shard for shard, k in needed if k >= first])
            yield [plan.batch(int(mine[k])) for k in range(first, min(first + block, len(mine)))]
        if remote:
            needs.publish_needs(self.caches, self._readers, self.sources, epoch, plan, None, [])

    def _batches(self, epoch: int, start: int, worker: int, num_workers: int, shared: bool):
        for (rows,) in self._worker_blocks(epoch, start, worker, num_workers, 1):
            yield self.make_batch(rows, shared=shared)

    def _slot_batches(self, ring: BatchRing, epoch: int, start: int, worker: int, num_workers: int):
        # Frees this worker's slots now, when DataLoader (re)starts the worker: batches of an earlier
        # iteration have all been consumed or discarded by then.
        generation = ring.start(worker)
        return self._slot_batch_gen(ring, generation, epoch, start, worker, num_workers)

    def _slot_batch_gen(self, ring: BatchRing, generation: int, epoch: int, start: int, worker: int,
                        num_workers: int):
        for block in self._worker_blocks(epoch, start, worker, num_workers, BATCHES_PER_MESSAGE):
            group = []
            for rows in block:
                batch = self._slot_batch(ring, worker, generation, rows)
                if batch is None:
                    return
                group.append(batch)
            yield SlotGroup(group)
