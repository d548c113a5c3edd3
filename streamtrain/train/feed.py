"""The micro-batches of each optimizer step, drawn from the loader without touching the training RNG.

A DataLoader draws its worker seed from the global torch RNG when its iterator starts (inside the first
next()); that draw is kept out of the training RNG stream, so that a resumed run consumes exactly the random
numbers (dropout) of an uninterrupted one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import torch

__all__ = ["isolated", "step_groups"]


def isolated(loader) -> Iterator:
    """Iterate `loader` with the global torch RNG state put back after every next()."""
    it = iter(loader)
    while True:
        state = torch.get_rng_state()
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            torch.set_rng_state(state)
        yield batch


def step_groups(loader, grad_accum: int, max_epochs: int | None, state: dict | None = None) -> Iterator[tuple[int, list, float]]:
    """Yield (epoch, up to `grad_accum` micro-batches, seconds spent waiting for them), across epochs.

    The loader keeps its own position (epoch, batches done): one pass over it is the rest of the current
    epoch, after which it points at the next epoch's first batch; `state` (a saved loader state) continues
    mid-epoch."""
    if state is not None:
        loader.load_state_dict(state)
    while max_epochs is None or loader.epoch < max_epochs:
        epoch = loader.epoch
        it = isolated(loader)
        while True:
            t0 = time.perf_counter()
            group = list(itertools.islice(it, grad_accum))
            wait_s = time.perf_counter() - t0
            if group:
                yield epoch, group, wait_s
            if len(group) < grad_accum:
                break
