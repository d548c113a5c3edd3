"""Which rank was lost: heartbeats through the rendezvous store (the TCPStore every rank of a torchrun job
already reaches), read when a collective fails.

Each rank's `Heartbeat` thread adds 1 to its counter in the store every `BEAT_S`, on a store connection of
its own (a long store wait of the main thread never delays it; a thread runs while the main thread waits in
a collective, which releases the GIL). When a collective fails, `lost_ranks` reads every counter twice,
`LOST_AFTER_S` apart: a rank whose counter did not move has stopped (killed, crashed, its node down). A rank
that finished normally marks itself done first, so it is never reported lost. Counters, not clocks, so the
nodes' clocks need not agree.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

__all__ = ["BEAT_S", "LOST_AFTER_S", "Heartbeat", "beat_count", "lost_ranks", "store_key"]

BEAT_S = 0.5  # heartbeat period: one store add per rank per period
LOST_AFTER_S = 3.0  # a counter that did not move for this long belongs to a lost rank


def store_key(name: str) -> str:
    """`name` in this job attempt's part of the store (torchrun restarts count from 0)."""
    return f"streamtrain/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def _beat_key(rank: int) -> str:
    return store_key(f"beat/{rank}")


def _done_key(rank: int) -> str:
    return store_key(f"done/{rank}")


class Heartbeat:
    """Started after the process group is up; `stop(done=True)` when this rank leaves normally."""

    def __init__(self, store: dist.Store, rank: int, host: str | None, port: int | None, timeout_s: float):
        self.store, self.rank = store, rank
        self._host, self._port, self._timeout_s = host, port, timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamtrain-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.store.add(_beat_key(self.rank), 1)
        self._thread.start()
        return self

    def _own_connection(self) -> dist.Store:
        if self._host is None or self._port is None:
            return self.store
        return dist.TCPStore(self._host, self._port, is_master=False, timeout=timedelta(seconds=self._timeout_s),
                             wait_for_workers=False)

    def _run(self) -> None:
        try:
            store = self._own_connection()
            while not self._stop.wait(BEAT_S):
                store.add(_beat_key(self.rank), 1)
        except Exception:  # the store is gone (its host died): the main thread finds out and says so
            return

    def stop(self, done: bool) -> None:
        if done:
            try:
                self.store.set(_done_key(self.rank), "1")
            except Exception:
                pass
        self._stop.set()
        self._thread.join(timeout=2 * BEAT_S)


def beat_count(store: dist.Store, rank: int) -> int:
    """Heartbeats of `rank` so far (0 before its first)."""
    return int(store.add(_beat_key(rank), 0))


def _counters(store: dist.Store, world_size: int) -> list[int]:
    return [beat_count(store, r) for r in range(world_size)]


def lost_ranks(store: dist.Store, world_size: int, me: int, window_s: float = LOST_AFTER_S) -> list[int] | None:
    """The ranks (other than `me`) whose heartbeat stopped and that did not finish normally, watched for
    `window_s`; None when the store itself cannot be reached."""
    try:
        before = _counters(store, world_size)
        time.sleep(window_s)
        after = _counters(store, world_size)
        stopped = [r for r in range(world_size) if r != me and after[r] == before[r]]
        return [r for r in stopped if not store.check([_done_key(r)])]
    except Exception:  # DistStoreError, or a RuntimeError from the connection
        return None
