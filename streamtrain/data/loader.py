"""`Loader` and `make_loader`: a DataLoader over a ShardStream (with no workers, the stream itself) that owns
the stream's position.

Position: a stream carries `(epoch, batches_done)`, the epoch and rank-local number of the *next* batch to
yield; only a `Loader` advances it (iterating a ShardStream directly yields the rest of the current epoch
without moving it). After the last batch of an epoch the position becomes (epoch + 1, 0). So
`for batch in loader` runs the rest of the current epoch, and `set_epoch(e)` is a no-op when e already is
the position's epoch (a resumed mid-epoch position survives the usual epoch loop). `state_dict()` is a
few integers; across world sizes the position is carried as *global* batches consumed, and a loader with
world size W' resumes at `global // W'` (at most W' - 1 global batches seen twice, none skipped). Workers
read the position from shared memory, so persistent workers see `set_epoch` and `load_state_dict`.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from streamtrain.data.stream import ShardStream
from streamtrain.data.transport import BATCHES_PER_MESSAGE, BatchRing, SlotGroup
from streamtrain.errors import DataError, UserError

__all__ = ["Loader", "make_loader"]


class Loader:
    """A DataLoader over a ShardStream that keeps the stream's position; iterate it once per epoch. With
    num_workers=0 it iterates the stream in this process directly (pinning each batch when asked to).

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

    @property
    def num_workers(self) -> int:
        return int(self._kwargs.get("num_workers", 0))

    @property
    def pin_memory(self) -> bool:
        """Whether batches come in pinned memory (asked for, and CUDA is available)."""
        return bool(self._kwargs.get("pin_memory", False))

    def __iter__(self):
        if self.num_workers == 0:
            return self._in_process()
        return self._from_workers()

    def _advance(self, epoch: int) -> None:
        """Count one yielded batch of `epoch` (only the main process's count moves: the running iteration's
        workers already hold their start)."""
        ds = self.dataset
        if ds.epoch != epoch:
            raise RuntimeError("the stream's position changed while a Loader was iterating it")
        ds.set_position(epoch, ds.batches_done + 1, publish=False)

    def _in_process(self):
        # The stream itself, without DataLoader: with no workers DataLoader adds nothing but its own
        # per-batch overhead (measured: 1.18x the epoch rate without it), and pins as Batch.pin_memory does.
        ds = self.dataset
        epoch, pin = ds.epoch, self.pin_memory
        for batch in ds:
            self._advance(epoch)
            yield batch.pin_memory() if pin else batch

    def _from_workers(self):
        ds = self.dataset
        if self._dataloader is None:
            self._dataloader = DataLoader(ds, batch_size=None, **self._kwargs)
        kept = getattr(self._dataloader, "_iterator", None)
        if kept is not None and not all(w.is_alive() for w in getattr(kept, "_workers", ())):
            # persistent workers of which one died (the failure may have surfaced outside next(), e.g. in
            # DataLoader's SIGCHLD handler): restarting them would wait for the dead one
            self._discard(ds.ring, kept)
        ring = self._prepare_ring(self._dataloader)
        epoch = ds.epoch
        ds.publish_position()  # read by the stream's __iter__ (in each worker) when iter() starts them
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
                if isinstance(batch, SlotGroup):
                    batch = batch.take()
                for b in batch if isinstance(batch, list) else (batch,):
                    self._advance(epoch)
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
        if ds.ring is None or not restart:
            # DataLoader holds up to prefetch_factor items per worker, and asks for the next one before
            # the current one is copied out
            slots = (dataloader.prefetch_factor + 1) * BATCHES_PER_MESSAGE
            ds.ring = BatchRing(dataloader.num_workers, slots, ds.max_tokens * ds.dim)
        ds.ring.new_generation()
        return ds.ring

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
            if state["num_batches"] != ds.num_batches(int(state["epoch"])):
                raise UserError(
                    f"loader state was saved with {state['num_batches']} batches in epoch {state['epoch']}, this "
                    f"stream has {ds.num_batches(int(state['epoch']))} (another max_tokens, window or drop_last?)"
                )
            done = state["batches_done"]
        else:
            done = state["global_batches_done"] // ds.world_size
        ds.set_position(int(state["epoch"]), int(done))


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
