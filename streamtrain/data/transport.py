"""Hand-over from DataLoader workers: `BatchRing`, shared-memory slots into which workers write padded
batches, and the small `SlotBatch` / `SlotGroup` messages that tell the main process where they are.
"""

from __future__ import annotations

import itertools
import os
import time
import weakref
from dataclasses import fields

import numpy as np
import torch

from streamtrain.data.batch import Batch, assemble_batch
from streamtrain.data.buffers import BatchBuffers

__all__ = ["BATCHES_PER_MESSAGE", "BatchRing", "SlotBatch", "SlotGroup", "shared_tensor"]

# Rings of this process by token, so that batch metadata unpickled in the main process (possibly in
# DataLoader's pin-memory thread) finds the memory it points into.
_RINGS: weakref.WeakValueDictionary[int, BatchRing] = weakref.WeakValueDictionary()
_TOKENS = itertools.count(1)
_WAIT_S = 0.0005


def shared_tensor(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed 1-d tensor in a new shared-memory segment: its pages are zero-filled by the kernel when
    first touched, so nothing is written (or copied) up front."""
    storage = torch.UntypedStorage._new_shared(numel * torch.empty(0, dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, (numel,))


class BatchRing:
    """`num_workers` regions of `slots_per_worker` slots of `slot_floats` float32 each, in shared memory.

    Handing a batch over as tensors costs a shared-memory segment per tensor per batch (create, map, send its
    file descriptor, unlink), several times what it costs to copy the batch once more.
    A ring is allocated once, in the main process, before the workers start (they inherit it, or receive it
    pickled with the dataset): one region per worker of `slots_per_worker` slots, each large enough for the
    largest batch. A worker writes a batch straight into a free slot of its region and sends only small
    metadata; the main process copies the slot out (into a fresh, or pinned, tensor, so users may keep
    batches) and releases it.

    Slot states live in a shared int64 array: 0 is free, anything else is the sequence number of the batch
    in it (a worker numbers its batches 1, 2, ...). Only the owning worker claims slots of its region and only
    the main process releases them, and a release is ignored unless the slot still holds that batch, so a
    late release of a batch from an abandoned iteration cannot free a slot that holds a newer one.
    A worker frees its whole region when it starts an iteration: a persistent worker restarted by DataLoader
    has had every batch of its previous iteration consumed or discarded by then.

    The owner sizes the regions so that a worker does not run out of slots in steady state (DataLoader keeps
    at most `prefetch_factor` items per worker between the worker and the consumer). Should a worker find
    none free (at the end of an epoch DataLoader may hand one worker more), it waits: the main process frees
    that worker's slots in order as it consumes its batches, so the wait ends, or it stops waiting and ends
    its iteration once the main process has started another iteration (`generation`) or has gone away.
    """

    def __init__(self, num_workers: int, slots_per_worker: int, slot_floats: int):
        if not (num_workers > 0 and slots_per_worker > 0 and slot_floats > 0):
            raise ValueError(f"BatchRing needs positive sizes, got num_workers={num_workers}, "
                             f"slots_per_worker={slots_per_worker}, slot_floats={slot_floats}")
        self.token = next(_TOKENS)
        self.num_workers = num_workers
        self.slots_per_worker = slots_per_worker
        self.slot_floats = slot_floats
        self._data = shared_tensor(num_workers * slots_per_worker * slot_floats, torch.float32)
        self._state = shared_tensor(num_workers * slots_per_worker, torch.int64)
        self._generation = shared_tensor(1, torch.int64)
        self._np: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._next_seq = 1  # per process: only the worker owning a region numbers its batches
        self._parent_pid: int | None = None
        self._taken: BatchBuffers | None = None  # main process: the memory batches are copied out into
        _RINGS[self.token] = self

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_np"], state["_taken"] = None, None
        return state

    def taken_buffers(self) -> BatchBuffers:
        """Where the main process copies batches out of the slots (not pinned): buffers reused once their
        batch is garbage, so a copy does not fault in fresh pages (see `buffers`)."""
        if self._taken is None:
            self._taken = BatchBuffers(self.slot_floats)
        return self._taken

    @staticmethod
    def find(token: int) -> BatchRing:
        """The ring `token` of this process (the main process, where batches are taken)."""
        return _RINGS[token]

    @property
    def nbytes(self) -> int:
        return self._data.numel() * 4

    def _views(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._np is None:
            data = self._data.numpy().reshape(self.num_workers, self.slots_per_worker, self.slot_floats)
            self._np = (data, self._state.numpy().reshape(self.num_workers, -1), self._generation.numpy())
        return self._np

    def slot(self, worker: int, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        """The first prod(shape) floats of a slot, as an array of `shape` (a view, not a copy)."""
        numel = int(np.prod(shape))
        if numel > self.slot_floats:
            raise ValueError(f"a batch of shape {shape} ({numel} floats) exceeds the slot size {self.slot_floats}")
        return self._views()[0][worker, slot, :numel].reshape(shape)

    # -- main process -------------------------------------------------------------------------------

    def new_generation(self) -> None:
        """Mark the start (or the abandonment) of an iteration: workers stop waiting for slots of the
        previous one."""
        self._views()[2][0] += 1

    def holds(self, worker: int, slot: int, seq: int) -> bool:
        return int(self._views()[1][worker, slot]) == seq

    def release(self, worker: int, slot: int, seq: int) -> None:
        state = self._views()[1]
        if state[worker, slot] == seq:
            state[worker, slot] = 0

    # -- worker -------------------------------------------------------------------------------------

    def start(self, worker: int) -> int:
        """Free the worker's region at the start of its iteration; returns the generation to watch."""
        _, state, generation = self._views()
        state[worker] = 0
        self._parent_pid = os.getppid()
        return int(generation[0])

    def claim(self, worker: int, generation: int) -> tuple[int, int] | None:
        """(slot, seq) of a free slot of `worker`'s region, now held; None when the iteration of
        `generation` is over (or the main process has exited) before one came free."""
        _, state, current = self._views()
        while True:
            free = np.flatnonzero(state[worker] == 0)
            if len(free):
                slot = int(free[0])
                seq = self._next_seq
                self._next_seq += 1
                state[worker, slot] = seq
                return slot, seq
            if int(current[0]) != generation or os.getppid() != self._parent_pid:
                return None
            time.sleep(_WAIT_S)


# Batches per DataLoader item from a worker (a block of consecutive batches of the rank's stream). Each
# item costs a DataLoader round trip (queues, pickling, thread hand-offs), more than building a batch;
# blocks spread that cost over several batches (benchmarks/bench_loader.py --block-sizes).
BATCHES_PER_MESSAGE = 4


class SlotBatch:
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
        if pin:  # torch's pinned allocator keeps the pages of freed blocks
            x = torch.empty(shape, dtype=torch.float32, pin_memory=True)
            out = x.numpy()
        else:
            out, _ = ring.taken_buffers().take(shape)
            x = torch.from_numpy(out)
        np.copyto(out, ring.slot(self.worker, self.slot, shape))  # the whole slot: padding zeroed by the worker
        # checked after the copy: the slot held this batch throughout
        intact = ring.holds(self.worker, self.slot, self.seq)
        ring.release(self.worker, self.slot, self.seq)
        if not intact:
            raise RuntimeError(f"batch slot {self.worker}/{self.slot} was reused before it was taken")
        batch = assemble_batch(x, self.lengths, self.ids, self.offsets)
        if pin:  # x is pinned already; the small tensors are pinned as Batch.pin_memory would
            batch = Batch(x=x, **{f.name: getattr(batch, f.name).pin_memory() for f in fields(Batch) if f.name != "x"})
        return batch



class SlotGroup:
    """One DataLoader item from a worker: consecutive `SlotBatch`es of the rank's stream."""

    __slots__ = ("batches",)

    def __init__(self, batches: list[SlotBatch]):
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
