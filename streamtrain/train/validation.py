"""Validation during fit, on every rank: each rank evaluates its share of the validation batches with the
plain model (no DDP, no compile) and the float64 sums are all-reduced, so the result is that of one process
over the whole set (every sequence exactly once) and no rank waits for another."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from streamtrain.eval.evaluate import EvalSums, accumulate_eval, eval_summary
from streamtrain.train.distributed import DistInfo, all_reduce_sum

__all__ = ["own_batches", "validate_on_every_rank"]


def own_batches(batches: Iterable, num_batches: int, dist: DistInfo, repeats: list) -> Iterator:
    """This rank's validation batches without the repeats that even out the ranks' counts: the epoch's
    `num_batches` batches are dealt round-robin, so the i-th batch of rank r is batch r + i * W, and those at
    `num_batches` or past it repeat the first ones (ShardStream's remainder policy); those go to `repeats`.
    All of `batches` is iterated, so a loader's position moves on to the next epoch's first batch."""
    for i, batch in enumerate(batches):
        if dist.rank + i * dist.world_size < num_batches:
            yield batch
        else:
            repeats.append(batch)


def validate_on_every_rank(model: torch.nn.Module, batches: Iterable | None, num_batches: int, dist: DistInfo,
                           dim: int, mean: np.ndarray, std: np.ndarray, data_mean: np.ndarray,
                           device: torch.device, autocast, sharded: bool) -> dict:
    """The validation summary (`eval_summary`), the same on every rank. `batches`: this rank's stream of
    the validation set (None: no validation data on this rank); `sharded`: the model is FSDP-sharded, whose
    every forward gathers parameters from all ranks, so the repeats are run too, into scratch sums."""
    sums = EvalSums(dim, device)
    if batches is not None:
        repeats: list = []
        accumulate_eval(model, own_batches(batches, num_batches, dist, repeats), sums, mean, std, data_mean,
                        device, autocast)
        if sharded and repeats:
            accumulate_eval(model, repeats, EvalSums(dim, device), mean, std, data_mean, device, autocast)
    if dist.enabled:
        sums.load_tensor(all_reduce_sum(dist, sums.as_tensor()))
    return eval_summary(sums)
