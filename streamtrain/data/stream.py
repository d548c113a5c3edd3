"""`ShardStream` (an IterableDataset of padded batches), `Batch`, and `make_loader` with exact resume.

Order of an epoch: `bucketing.plan_epoch(seed, epoch)` gives the global list of batches; whole batches
are dealt round-robin to ranks (`bucketing.deal_batches`), then to DataLoader workers in blocks of
BATCHES_PER_MESSAGE consecutive batches, round-robin (block j of the iteration to worker j % W; without a
Loader, batch k to worker k % W). DataLoader collects worker outputs round-robin in order, so a rank sees
the same stream for any `num_workers`, and a resume may change it.

Position: a stream carries `(epoch, batches_done)`, the epoch and rank-local number of the *next* batch to
yield; only a `Loader` advances it (iterating a ShardStream directly yields the rest of the current epoch
without moving it). When the last batch of an epoch is handed out the position becomes (epoch + 1, 0).
So:

* `for batch in loader` runs the rest of the current epoch; the next `for` runs the next epoch.
* `ds.set_epoch(e)` / `loader.set_epoch(e)` starts epoch e from its first batch, unless e already is the
  position's epoch (then it is a no-op, so a resumed mid-epoch position survives the usual
  `for epoch in range(start, E): ds.set_epoch(epoch); for batch in loader: ...`).
* `loader.state_dict()` is a few integers; `load_state_dict` restores the position, skipping in the
  plan (no skipped batch is read). Across world sizes the position is carried as the number of *global*
  batches consumed (`batches_done * world_size`, i.e. the prefix of the epoch's batch list that all ranks
  together have taken); a loader with world size W' resumes at `global // W'`, so at most W' - 1 global
  batches are seen twice and none is skipped.

Remainder policy (world_size > 1): `drop_last=False` (default) repeats fewer than world_size batches from
the start of the epoch's shuffled list so every rank gets ceil(num_batches / world_size) batches;
`drop_last=True` drops the last num_batches % world_size, so each sequence is seen at most once. With
world_size 1 every item (a sequence, or each window of a long one) is yielded exactly once per epoch.

Workers hold the position in a small shared-memory tensor, so persistent workers see `set_epoch` and
`load_state_dict` made in the main process.

Checksums (`verify=True`, the default): building a ShardStream checks the lengths file and every shard it can
read against index.json, hashing only file versions not verified before (`checksums.verify_files`, on a
thread per core); every process that then maps a shard (this one, each worker) checks the version it
mapped and hashes it first if it is not the verified one (`checksums.check_mapped`). Sizes, row counts and
row lengths are checked whatever `verify`.

Hand-over from workers: a `Loader` with workers allocates a `shm.BatchRing` (a few batch-sized slots per
worker in shared memory) before the workers start. A worker writes each padded batch straight into a free
slot and sends, per block, only slot numbers and the small per-row arrays (a `_SlotGroup`); the main
process (or DataLoader's pin-memory thread, straight into pinned memory) copies x out of each slot, frees
it, and rebuilds the mask from the lengths. This replaces a shared-memory segment per tensor per batch
and a DataLoader round trip per batch, each of which costs more than building the batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from streamtrain.data import bucketing
from streamtrain.dataset.checksums import index_files, verified_lengths, verify_files
from streamtrain.data.reader import ShardReader
from streamtrain.data.shm import BatchRing, shared_tensor
from streamtrain.errors import DataError, UserError
from streamtrain.dataset import Index, read_index

__all__ = ["Batch", "ShardStream", "Loader", "make_loader"]

# Batches per DataLoader item from a worker (a block of consecutive batches of the rank's stream). Each
# item costs a DataLoader round trip (queues, pickling, thread hand-offs), more than building a batch;
# blocks spread that cost over several batches (benchmarks/bench_loader.py --block-sizes).
BATCHES_PER_MESSAGE = 4


@dataclass
class Batch:
    """A padded batch. Rows are items: whole sequences, or windows of sequences longer than max_len."""

    x: torch.Tensor  # float32 (B, T, D), zero right-padding
    mask: torch.Tensor  # bool (B, T), True on real vectors
    lengths: torch.Tensor  # int64 (B,) real vectors per row
    ids: torch.Tensor  # int64 (B,) global sequence id (position in the dataset)
    offsets: torch.Tensor  # int64 (B,) first vector of the row within its sequence (0 unless windowed)

    @property
    def num_real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_padded_tokens(self) -> int:
        return self.x.shape[0] * self.x.shape[1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader's pin-memory thread."""
        return self._map(lambda t: t.pin_memory())


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
        self._ring: BatchRing | None = None

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
            self._set_position(int(epoch), 0)

    def _set_position(self, epoch: int, batches_done: int, publish: bool = True) -> None:
        if batches_done >= self._num_batches > 0:
            epoch, batches_done = epoch + 1, 0
        self._epoch, self._batches_done = epoch, batches_done
        if publish:
            self._publish_position()

    def _publish_position(self) -> None:
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
        return _assemble(x, lengths, ids, offsets)

    def _slot_batch(self, ring: BatchRing, worker: int, generation: int, item_indices: np.ndarray,
                    padded_len: int) -> _SlotBatch | None:
        """Build a batch in a free slot of `ring`; None when the iteration ended while waiting for one."""
        claimed = ring.claim(worker, generation)
        if claimed is None:
            return None
        slot, seq = claimed
        ids, offsets, lengths = self._rows(item_indices)
        out = ring.slot(worker, slot, (len(item_indices), padded_len, self.dim))
        # the slot holds an earlier batch: the rows are overwritten and the padding zeroed, each once
        self.reader.gather(out, ids, offsets, lengths, zero_padding=True)
        return _SlotBatch(ring.token, worker, slot, seq, padded_len, self.dim, lengths, ids, offsets)

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
        if info is not None and self._ring is not None:
            return self._slot_batches(self._ring, epoch, start, worker, num_workers)
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
            yield _SlotGroup(group)


def _compact(values: np.ndarray) -> np.ndarray:
    """int64 `values` as int32 when they fit (a copy either way: not a view of a larger array)."""
    values = np.asarray(values, dtype=np.int64)
    if len(values) == 0 or (values.min() >= 0 and values.max() < 2**31):
        return values.astype(np.int32)
    return values.copy()


def _assemble(x: torch.Tensor, lengths: np.ndarray, ids: np.ndarray, offsets: np.ndarray) -> Batch:
    mask = np.arange(x.shape[1])[None, :] < lengths[:, None]
    return Batch(
        x=x,
        mask=torch.from_numpy(mask),
        lengths=torch.from_numpy(lengths),
        ids=torch.from_numpy(ids),
        offsets=torch.from_numpy(offsets),
    )


class _SlotBatch:
    """What a worker sends for a batch it wrote into a `BatchRing` slot: where x is, and the row arrays
    (int64 numpy, pickled by value: a few KB). `take()` in the main process turns it into a Batch."""

    __slots__ = ("ring_token", "worker", "slot", "seq", "padded_len", "dim", "lengths", "ids", "offsets")

    def __init__(self, ring_token: int, worker: int, slot: int, seq: int, padded_len: int, dim: int,
                 lengths: np.ndarray, ids: np.ndarray, offsets: np.ndarray):
        self.ring_token, self.worker, self.slot, self.seq = ring_token, worker, slot, seq
        self.padded_len, self.dim = padded_len, dim
        self.lengths, self.ids, self.offsets = lengths, ids, offsets

    def __getstate__(self):
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state) -> None:
        for name, value in zip(self.__slots__, state):
            setattr(self, name, value)

    def take(self, pin: bool = False) -> Batch:
        """Copy x out of the slot (into pinned memory when `pin`), free the slot, and build the Batch."""
        ring = BatchRing.find(self.ring_token)
        shape = (len(self.lengths), self.padded_len, self.dim)
        x = torch.empty(shape, dtype=torch.float32, pin_memory=pin)
        np.copyto(x.numpy(), ring.slot(self.worker, self.slot, shape))
        # checked after the copy: the slot held this batch throughout
        intact = ring.holds(self.worker, self.slot, self.seq)
        ring.release(self.worker, self.slot, self.seq)
        if not intact:
            raise RuntimeError(f"batch slot {self.worker}/{self.slot} was reused before it was taken")
        batch = _assemble(x, self.lengths, self.ids, self.offsets)
        if pin:  # x is pinned already; the small tensors are pinned as Batch.pin_memory would
            batch = Batch(x=x, **{f.name: getattr(batch, f.name).pin_memory() for f in fields(Batch) if f.name != "x"})
        return batch



class _SlotGroup:
    """One DataLoader item from a worker: consecutive `_SlotBatch`es of the rank's stream."""

    __slots__ = ("batches",)

    def __init__(self, batches: list[_SlotBatch]):
        self.batches = batches

    def __getstate__(self):
        return self.batches

    def __setstate__(self, state) -> None:
        self.batches = state

    def take(self, pin: bool = False) -> list[Batch]:
        return [b.take(pin) for b in self.batches]

    def pin_memory(self) -> list[Batch]:
        """Called by DataLoader's pin-memory thread: one copy per batch, from the slot into pinned memory."""
        return self.take(pin=True)


class Loader:
    """A DataLoader over a ShardStream that keeps the stream's position; iterate it once per epoch.

    state_dict() -> {"epoch", "batches_done", "global_batches_done", "seed", "world_size", "num_batches",
    "num_items"}: the next batch after load_state_dict() is exactly the next batch the saved loader would
    have yielded (also with another num_workers; with another world_size see the module docstring).
    An iteration that fails (a DataError, a worker that died) discards its workers; the next iteration
    starts fresh ones at the batch after the last one yielded.
    """

    def __init__(self, dataset: ShardStream, **dataloader_kwargs):
        self.dataset = dataset
        self._kwargs = dataloader_kwargs
        self._dataloader: DataLoader | None = None

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def batches_done(self) -> int:
        return self.dataset.batches_done

    def __len__(self) -> int:
        return self.dataset.num_batches()

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        ds = self.dataset
        if self._dataloader is None:
            self._dataloader = DataLoader(ds, batch_size=None, **self._kwargs)
        kept = getattr(self._dataloader, "_iterator", None)
        if kept is not None and not all(w.is_alive() for w in getattr(kept, "_workers", ())):
            # persistent workers of which one died (the failure may have surfaced outside next(), e.g. in
            # DataLoader's SIGCHLD handler): restarting them would wait for the dead one
            self._discard(ds._ring, kept)
        ring = self._prepare_ring(self._dataloader)
        epoch = ds.epoch
        ds._publish_position()  # read by the stream's __iter__ (in each worker) when iter() starts them
        try:
            it = iter(self._dataloader)
        except Exception:
            self._discard(ring, getattr(self._dataloader, "_iterator", None))
            raise
        try:
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    return
                except Exception as e:
                    # Any failure (a DataError, a worker that died) leaves the iterator unusable; a
                    # persistent one would be reused by the next iteration and fail again. Discard it:
                    # the next iteration starts fresh workers from the position, which only moves on a
                    # yielded batch.
                    self._discard(ring, it)
                    if isinstance(e, DataError):
                        raise DataError(_worker_message(str(e))) from None
                    raise
                if isinstance(batch, _SlotGroup):
                    batch = batch.take()
                for b in batch if isinstance(batch, list) else (batch,):
                    if ds.epoch != epoch:
                        raise RuntimeError("the stream's position changed while a Loader was iterating it")
                    # the running iteration's workers already hold their start: only the main process's
                    # count moves
                    ds._set_position(epoch, ds.batches_done + 1, publish=False)
                    yield b
        finally:
            if ring is not None:
                ring.new_generation()  # ended or abandoned: a worker waiting for a slot of it stops

    def _prepare_ring(self, dataloader: DataLoader) -> BatchRing | None:
        """The ring this iteration's workers write into. A fresh one whenever DataLoader is about to start
        workers: those of an abandoned iterator may still be writing into the previous one."""
        ds = self.dataset
        if dataloader.num_workers == 0:
            return None
        restart = dataloader.persistent_workers and getattr(dataloader, "_iterator", None) is not None
        if ds._ring is None or not restart:
            # DataLoader holds up to prefetch_factor items per worker, and asks for the next one before
            # the current one is copied out
            slots = (dataloader.prefetch_factor + 1) * BATCHES_PER_MESSAGE
            ds._ring = BatchRing(dataloader.num_workers, slots, ds.max_tokens * ds.dim)
        ds._ring.new_generation()
        return ds._ring

    def _discard(self, ring: BatchRing | None, it) -> None:
        """Drop a failed DataLoader iterator and its workers; the next iteration starts fresh ones (and,
        with no iterator kept, a fresh ring)."""
        if ring is not None:
            ring.new_generation()  # a worker waiting for a slot stops, so shutdown is quick
        if it is None:
            return
        # Left to garbage collection, workers of a failed iterator take seconds to join.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if self._dataloader is not None and getattr(self._dataloader, "_iterator", None) is it:
            self._dataloader._iterator = None

    def state_dict(self) -> dict:
        ds = self.dataset
        return {
            "epoch": ds.epoch,
            "batches_done": ds.batches_done,
            "global_batches_done": ds.batches_done * ds.world_size,
            "seed": ds.seed,
            "world_size": ds.world_size,
            "num_batches": ds.num_batches(),
            "num_items": ds.num_items,
        }

    def load_state_dict(self, state: dict) -> None:
        ds = self.dataset
        if state["seed"] != ds.seed:
            raise UserError(f"loader state was saved with seed {state['seed']}, this stream has seed {ds.seed}")
        if state["num_items"] != ds.num_items:
            raise UserError(
                f"loader state was saved for {state['num_items']} items, this stream plans {ds.num_items} "
                "(another dataset, ids, or max_len?)"
            )
        if state["world_size"] == ds.world_size:
            if state["num_batches"] != ds.num_batches():
                raise UserError(
                    f"loader state was saved with {state['num_batches']} batches per epoch, this stream has "
                    f"{ds.num_batches()} (another max_tokens or drop_last?)"
                )
            done = state["batches_done"]
        else:
            done = state["global_batches_done"] // ds.world_size
        ds._set_position(int(state["epoch"]), int(done))


def _worker_message(message: str) -> str:
    """The original one-line message of a DataError re-raised by DataLoader from a worker (which prefixes
    "Caught DataError in DataLoader worker process N" and the worker's traceback)."""
    marker = f"{DataError.__module__}.{DataError.__qualname__}: "
    at = message.rfind(marker)
    return message[at + len(marker) :].strip() if at >= 0 else message


def make_loader(
    dataset: ShardStream,
    num_workers: int = 2,
    pin_memory: bool = True,
    prefetch_factor: int = 4,
    persistent_workers: bool = True,
    multiprocessing_context: str | None = None,
) -> Loader:
    """A Loader over `dataset`: DataLoader with batch_size=None (the stream batches), pinned memory only
    when CUDA is available, about `prefetch_factor` batches in flight per worker (rounded up to whole
    blocks of BATCHES_PER_MESSAGE), workers kept across epochs.

    Workers build batches in a shared-memory ring allocated once per worker start (per worker, a block
    more than its batches in flight, each slot max_tokens * dim float32) and send only metadata; the main
    process pays one copy per batch (into pinned memory on CUDA). Workers pay off when the main process is busy driving an accelerator;
    with an idle main process on few cores num_workers=0 is as fast (benchmarks/bench_loader.py).
    """
    kwargs: dict = {"num_workers": num_workers, "pin_memory": bool(pin_memory and torch.cuda.is_available())}
    if num_workers > 0:
        kwargs.update(
            # DataLoader counts items, blocks of BATCHES_PER_MESSAGE batches
            prefetch_factor=max(1, -(-prefetch_factor // BATCHES_PER_MESSAGE)),
            persistent_workers=persistent_workers,
            multiprocessing_context=multiprocessing_context,
        )
    return Loader(dataset, **kwargs)
