"""`ShardStream`: an IterableDataset of length-bucketed, padded batches for one rank, with a position for
exact resume. The order and the remainder policy are described here; the Loader that moves the position,
and the DataLoader workers, in `loader`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from streamtrain.data import bucketing
from streamtrain.data.batch import Batch, assemble_batch
from streamtrain.data.reader import ShardReader
from streamtrain.data.transport import (
    BATCHES_PER_MESSAGE,
    BatchRing,
    SlotBatch,
    SlotGroup,
    shared_tensor,
)
from streamtrain.dataset import Index, read_index
from streamtrain.dataset.checksums import index_files, verified_lengths, verify_files
from streamtrain.errors import DataError, UserError

__all__ = ["ShardStream"]


class ShardStream(IterableDataset):
    """Token-budget batches from a dataset folder, for one rank; see the module docstring for the order.

    root: dataset folder (index.json, lengths.npy, shards/).
    max_tokens: bound on padded tokens B * T of every batch.
    seed, shuffle: the order is a pure function of (seed, epoch, world_size); shuffle=False gives a fixed
        order (id order within ascending buckets), for evaluation.
    rank, world_size: this process's share of every epoch.
    max_len: longer sequences become windows overlapping by one vector (default: max_tokens rounded down
        to pad_multiple, the longest row a batch can hold).
    drop_last: remainder policy when the batch count is not a multiple of world_size.
    ids: optional global ids to use (e.g. a train/val split from `bucketing.split_ids`).
    pad_multiple: padded T is a multiple of this.
    max_shapes: most distinct padded T values (see `bucketing.bucket_bounds`).
    max_sequences: at most this many rows per batch (with max_tokens >= max_sequences * max_len this is
        a fixed batch size B of similar-length sequences, except the last batch of each bucket).
    verify: check the sha256 of the lengths file and of every shard against index.json before any of its
        rows is used, in every process (see the module docstring); False for storage you trust.
    max_open_shards: most shards memory-mapped at once per process (default
        `reader.DEFAULT_MAX_OPEN_SHARDS`); the least recently used is unmapped first.

    Only index.json and lengths.npy are read here (and, with verify, every shard hashed whose file version
    was not verified before); shards are memory-mapped lazily in the process that iterates, so the object
    pickles small into DataLoader workers.

    Order of an epoch: `bucketing.plan_epoch(seed, epoch)` gives the global list of batches; whole batches
    are dealt round-robin to ranks (`bucketing.deal_batches`), then to DataLoader workers in blocks of
    BATCHES_PER_MESSAGE consecutive batches (block j of an iteration to worker j % W).

    Remainder policy (world_size > 1): `drop_last=False` (default) repeats fewer than world_size batches from
    the start of the epoch's shuffled list so every rank gets ceil(num_batches / world_size) batches;
    `drop_last=True` drops the last num_batches % world_size. With world_size 1 every item (a sequence, or
    each window of a long one) is yielded exactly once per epoch.

    Checksums (`verify=True`, the default): building a ShardStream checks the lengths file and every shard
    against index.json, hashing only file versions not verified before (`checksums.verify_files`); every
    process that then maps a shard checks the version it mapped (`checksums.check_mapped`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
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
        verify: bool = True,
        max_open_shards: int | None = None,
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
        self.index: Index = read_index(root)
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
        self.verify = bool(verify)
        self.max_open_shards = None if max_open_shards is None else int(max_open_shards)
        self._check_shard_files()
        if ids is not None:
            ids = np.unique(np.asarray(ids, dtype=np.int64))
            if len(ids) and (ids[0] < 0 or ids[-1] >= self.index.num_sequences):
                raise UserError(f"ids must be in [0, {self.index.num_sequences}), got {ids[0]}..{ids[-1]}")
        if self.verify:
            verify_files(index_files(self.index, self._shards_read(ids)))

        lengths = verified_lengths(self.index) if self.verify else self.index.lengths()
        if ids is None:
            items = bucketing.window_items(lengths, self.max_len)
        else:
            items = bucketing.window_items(lengths[ids], self.max_len, ids)
        # The items travel pickled into every DataLoader worker, and a dataset may hold 100M sequences:
        # kept compact (int32 where the values fit; ids and offsets implicit when they are 0..N-1 and 0).
        self._num_items = len(items)
        self._item_lengths = _compact(items.lengths)
        # every sequence once, in id order, unwindowed (windows add items, so equal counts mean none)
        everything = ids is None or len(ids) == self.index.num_sequences
        identity = everything and len(items) == self.index.num_sequences
        self._item_ids = None if identity else _compact(items.ids)
        self._item_offsets = _compact(items.offsets) if items.offsets.any() else None
        self.bounds = bucketing.bucket_bounds(items.lengths, self.pad_multiple, max_shapes)
        del items
        self._items: bucketing.Items | None = None  # the int64 form for callers, built on first use
        # Batch counts per bucket do not depend on the shuffle, so they are the same in every epoch.
        self._num_global_batches = bucketing.plan_epoch(
            self._item_lengths, self.bounds, self.max_tokens, 0, 0, shuffle=False, max_sequences=self.max_sequences
        ).num_batches
        self._num_batches = len(
            bucketing.deal_batches(self._num_global_batches, 0, self.world_size, self.drop_last)
        )
        self._epoch = 0
        self._batches_done = 0
        # (epoch, first batch) of the iteration about to start, read by DataLoader workers when they
        # (re)start; shared memory so that persistent workers see positions set in the main process
        self._iteration_start = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._reader: ShardReader | None = None
        self._plan_cache: tuple[int, bucketing.Plan] | None = None
        # set by a Loader before it starts workers; None: workers hand batches over as tensors
        self.ring: BatchRing | None = None

    def _check_shard_files(self) -> None:
        for info in self.index.shards:
            path = self.index.root / info.file
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{path}: shard file is missing") from None
            if size != info.bytes:
                raise DataError(f"{path}: {size} bytes, index.json says {info.bytes} (truncated or replaced shard)")

    def _shards_read(self, ids: np.ndarray | None) -> list[int]:
        """Numbers of the shards holding rows of `ids` (sorted, unique; None: every sequence)."""
        if ids is None:
            return [s for s, info in enumerate(self.index.shards) if info.num_sequences > 0]
        shards = np.searchsorted(self.index.shard_offsets, ids, side="right") - 1  # non-decreasing
        return shards[np.concatenate([[True], shards[1:] != shards[:-1]])].tolist() if len(shards) else []

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader"] = None
        state["_plan_cache"] = None
        state["_items"] = None
        return state

    @property
    def items(self) -> bucketing.Items:
        """What the plan batches (int64 arrays; batch item indices of `plan()` index into them)."""
        if self._items is None:
            n = self._num_items
            self._items = bucketing.Items(
                np.arange(n, dtype=np.int64) if self._item_ids is None else self._item_ids.astype(np.int64),
                np.zeros(n, np.int64) if self._item_offsets is None else self._item_offsets.astype(np.int64),
                self._item_lengths.astype(np.int64),
            )
        return self._items

    @property
    def num_items(self) -> int:
        return self._num_items

    # -- sizes and position ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._num_batches

    def num_batches(self) -> int:
        """Batches this rank yields per epoch (the same in every epoch and on every rank)."""
        return self._num_batches

    @property
    def num_global_batches(self) -> int:
        """Batches in an epoch's plan before dealing to ranks."""
        return self._num_global_batches

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
        if batches_done >= self._num_batches > 0:
            epoch, batches_done = epoch + 1, 0
        self._epoch, self._batches_done = epoch, batches_done
        if publish:
            self.publish_position()

    def publish_position(self) -> None:
        self._iteration_start[0] = self._epoch
        self._iteration_start[1] = self._batches_done

    # -- plan -----------------------------------------------------------------------------------------

    def plan(self, epoch: int) -> bucketing.Plan:
        """The global batch list of `epoch` (cached for the last epoch asked)."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            plan = bucketing.plan_epoch(
                self._item_lengths, self.bounds, self.max_tokens, self.seed, epoch, self.shuffle, self.max_sequences
            )
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    def rank_batches(self) -> np.ndarray:
        """Epoch batch numbers (into `plan(epoch)`) this rank yields, in order; the same for every epoch."""
        return bucketing.deal_batches(self._num_global_batches, self.rank, self.world_size, self.drop_last)

    # -- reading --------------------------------------------------------------------------------------

    @property
    def reader(self) -> ShardReader:
        if self._reader is None:
            self._reader = ShardReader(self.index, verify=self.verify, max_open_shards=self.max_open_shards)
        return self._reader

    def _rows(self, item_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int64 (ids, offsets, lengths) of the rows of a batch (new arrays: they become the Batch's)."""
        idx = np.asarray(item_indices)
        ids = np.array(idx, dtype=np.int64) if self._item_ids is None else self._item_ids[idx].astype(np.int64)
        offsets = (
            np.zeros(len(idx), np.int64) if self._item_offsets is None else self._item_offsets[idx].astype(np.int64)
        )
        return ids, offsets, self._item_lengths[idx].astype(np.int64)

    def make_batch(self, item_indices: np.ndarray, padded_len: int, shared: bool = False) -> Batch:
        """Copy the items into one zero-padded (B, T, D) array; `shared`: allocate it in shared memory so a
        DataLoader worker hands it to the main process without another copy."""
        ids, offsets, lengths = self._rows(item_indices)
        shape = (len(item_indices), padded_len, self.dim)
        if shared:
            x = shared_tensor(int(np.prod(shape)), torch.float32).view(shape)
            out = x.numpy()
        else:
            # numpy, not torch.zeros: calloc'd pages, no intra-op thread pool for a 1 MB fill
            out = np.zeros(shape, dtype=np.float32)
            x = torch.from_numpy(out)
        # padding zeroed explicitly, not left to how the shared-memory allocator hands out pages
        self.reader.gather(out, ids, offsets, lengths, zero_padding=shared)
        return assemble_batch(x, lengths, ids, offsets)

    def _slot_batch(self, ring: BatchRing, worker: int, generation: int, item_indices: np.ndarray,
                    padded_len: int) -> SlotBatch | None:
        """Build a batch in a free slot of `ring`; None when the iteration ended while waiting for one."""
        claimed = ring.claim(worker, generation)
        if claimed is None:
            return None
        slot, seq = claimed
        ids, offsets, lengths = self._rows(item_indices)
        out = ring.slot(worker, slot, (len(item_indices), padded_len, self.dim))
        # the slot holds an earlier batch: the rows are overwritten and the padding zeroed, each once
        self.reader.gather(out, ids, offsets, lengths, zero_padding=True)
        return SlotBatch(ring.token, worker, slot, seq, padded_len, self.dim, lengths, ids, offsets)

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
        consecutive batches (lists of (item indices, padded T)), block j of the iteration to worker
        j % num_workers. DataLoader hands worker outputs over round-robin in order, so the main process
        sees the same sequence as from one process."""
        plan = self.plan(epoch)
        mine = self.rank_batches()
        for first in range(start + worker * block, len(mine), num_workers * block):
            yield [plan.batch(int(mine[k])) for k in range(first, min(first + block, len(mine)))]

    def _batches(self, epoch: int, start: int, worker: int, num_workers: int, shared: bool):
        for (items, padded_len), in self._worker_blocks(epoch, start, worker, num_workers, 1):
            yield self.make_batch(items, padded_len, shared=shared)

    def _slot_batches(self, ring: BatchRing, epoch: int, start: int, worker: int, num_workers: int):
        # Frees this worker's slots now, when DataLoader (re)starts the worker: batches of an earlier
        # iteration have all been consumed or discarded by then.
        generation = ring.start(worker)
        return self._slot_batch_gen(ring, generation, epoch, start, worker, num_workers)

    def _slot_batch_gen(self, ring: BatchRing, generation: int, epoch: int, start: int, worker: int,
                        num_workers: int):
        for block in self._worker_blocks(epoch, start, worker, num_workers, BATCHES_PER_MESSAGE):
            group = []
            for items, padded_len in block:
                batch = self._slot_batch(ring, worker, generation, items, padded_len)
                if batch is None:
                    return
                group.append(batch)
            yield SlotGroup(group)


def _compact(values: np.ndarray) -> np.ndarray:
    """int64 `values` as int32 when they fit (a copy either way: not a view of a larger array)."""
    values = np.asarray(values, dtype=np.int64)
    if len(values) == 0 or (values.min() >= 0 and values.max() < 2**31):
        return values.astype(np.int32)
    return values.copy()
