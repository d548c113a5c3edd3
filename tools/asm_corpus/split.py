"""Assigning whole binaries to train, val (model selection) and test (the report), in the seeded build order.

Binaries are assigned as they are written, before the budget says how many there will be: after n
binaries, test holds about round(n * test_fraction) and val about round(n * val_fraction), each at
least one once there is room, and train always at least one.  Functions are de-duplicated across the
whole corpus, so no function is in two splits.
"""

from __future__ import annotations

import math

__all__ = ["SPLITS", "SplitAssigner", "holdout_targets"]

SPLITS: tuple[str, ...] = ("train", "val", "test")


def _target(n_binaries: int, fraction: float, room: int) -> int:
    if fraction <= 0 or room < 1:
        return 0
    return min(max(int(math.floor(n_binaries * fraction + 0.5)), 1), room)


def holdout_targets(n_binaries: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) binaries wanted among the first ``n_binaries``: round(n*F), but >= 1 each where
    the fraction is positive and there is room, and always >= 1 left for train.  Test is served
    first: a corpus too small for all three splits keeps the honest report rather than the selection."""
    test = _target(n_binaries, test_fraction, n_binaries - 1)
    val = _target(n_binaries, val_fraction, n_binaries - 1 - test)
    return val, test


class SplitAssigner:
    """Hands out the split of each next binary so the counts follow ``holdout_targets``."""

    def __init__(self, val_fraction: float, test_fraction: float) -> None:
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.counts = dict.fromkeys(SPLITS, 0)

    def next(self) -> str:
        n_binaries = sum(self.counts.values()) + 1
        val, test = holdout_targets(n_binaries, self.val_fraction, self.test_fraction)
        if self.counts["test"] < test:
            name = "test"
        elif self.counts["val"] < val:
            name = "val"
        else:
            name = "train"
        self.counts[name] += 1
        return name
