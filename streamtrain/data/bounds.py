"""The bucket bounds of a length histogram, computed once per node rather than once per process: the
exact dynamic program (`bucketing.bucket_bounds`) takes about a second at max_len 8192, and every rank and
DataLoader worker of a run asks for the same bounds. Kept in the user cache under a hash of the histogram
and the parameters; a missing or unreadable entry only means computing them again.
"""

from __future__ import annotations

import hashlib

import numpy as np

from streamtrain.data import bucketing
from streamtrain.user_cache import cache_dir

__all__ = ["histogram_bounds"]

_VERSION = b"bounds-1"


def histogram_bounds(values: np.ndarray, counts: np.ndarray, pad_multiple: int, max_shapes: int) -> np.ndarray:
    """`bucketing.bucket_bounds(values, pad_multiple, max_shapes, counts=counts)`, from the cache when an
    earlier process on this machine computed it."""
    values = np.ascontiguousarray(values, dtype=np.int64)
    counts = np.ascontiguousarray(counts, dtype=np.float64)
    digest = hashlib.sha256(_VERSION + values.tobytes() + counts.tobytes()
                            + np.array([pad_multiple, max_shapes], np.int64).tobytes()).hexdigest()[:32]
    root = cache_dir()
    path = None if root is None else root / "bounds" / f"{digest}.npy"
    if path is not None:
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.ndim == 1 and len(cached) and cached.dtype == np.int64:
                return cached
        except (OSError, ValueError):
            pass
    bounds = bucketing.bucket_bounds(values, pad_multiple, max_shapes, counts=counts)
    if path is not None:
        try:
            from streamtrain.dataset import atomic_write_bytes, npy_bytes

            atomic_write_bytes(path, npy_bytes(bounds.astype(np.int64)))
        except OSError:
            pass
    return bounds
