"""Per-dimension running statistics (float64), mergeable across shards and processes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RunningStats", "length_histogram", "length_histogram_json"]


@dataclass
class RunningStats:
    """Per-dimension count / mean / M2 in float64, merged with Chan et al.'s parallel update, so that
    statistics of shards computed in separate processes combine exactly as if computed in one pass."""

    dim: int
    count: int = 0
    mean: np.ndarray = None  # type: ignore[assignment]
    m2: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.dim, dtype=np.float64)
        if self.m2 is None:
            self.m2 = np.zeros(self.dim, dtype=np.float64)

    def add_values(self, values: np.ndarray) -> None:
        """values: (N, dim) of any float dtype."""
        if len(values) == 0:
            return
        v = np.asarray(values, dtype=np.float64)
        mean = v.mean(axis=0)
        m2 = ((v - mean) ** 2).sum(axis=0)
        self.merge(RunningStats(self.dim, len(v), mean, m2))

    def merge(self, other: "RunningStats") -> None:
        if other.count == 0:
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        if self.count == 0:
            return np.zeros(self.dim, dtype=np.float64)
        return np.sqrt(np.maximum(self.m2 / self.count, 0.0))

    def to_json(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, obj: dict) -> "RunningStats":
        mean = np.asarray(obj["mean"], dtype=np.float64)
        return cls(len(mean), int(obj["count"]), mean, np.asarray(obj["m2"], dtype=np.float64))


def length_histogram(lengths: np.ndarray, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """(distinct lengths, how many sequences have each), int64, in one chunked pass (memory-mapped lengths
    of 100M sequences are read once, with bounded temporaries)."""
    lengths = np.asarray(lengths)
    total = np.zeros(0, dtype=np.int64)
    for a in range(0, len(lengths), chunk):
        part = np.bincount(np.asarray(lengths[a:a + chunk], dtype=np.int64))
        if len(part) > len(total):
            part[: len(total)] += total
            total = part
        else:
            total[: len(part)] += part
    values = np.flatnonzero(total)
    return values.astype(np.int64), total[values].astype(np.int64)


def length_histogram_json(lengths: np.ndarray) -> dict:
    """index.json's `length_histogram`: the distinct sequence lengths and their counts, from which a reader
    picks its bucket bounds without reading the lengths of every sequence."""
    values, counts = length_histogram(lengths)
    return {"lengths": values.tolist(), "counts": counts.tolist()}
