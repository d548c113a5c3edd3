"""The Arrow IPC files that predict and embed write: one row per sequence, vectors as fixed-size lists of
float32, readable with pyarrow alone; written atomically (temp file, fsync, rename) as rows arrive."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

__all__ = ["vectors_type", "sequences_type", "vectors_array", "sequences_array", "write_arrow_rows"]

ROWS_PER_BATCH = 512  # rows per record batch: bounds the memory held before it reaches the file


def vectors_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def sequences_type(dim: int) -> pa.DataType:
    return pa.list_(vectors_type(dim))


def vectors_array(rows: np.ndarray) -> pa.Array:
    """(N, dim) -> a fixed_size_list<float32, dim> array of N rows."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


def sequences_array(seqs: list[np.ndarray], dim: int) -> pa.Array:
    """[(L_i, dim)] -> a list<fixed_size_list<float32, dim>> array, row i of L_i vectors."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("more than 2**31 vectors in one record batch")
    flat = np.concatenate(seqs) if seqs else np.zeros((0, dim), np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), vectors_array(flat.reshape(-1, dim)))


def write_arrow_rows(path: str | os.PathLike, schema: pa.Schema, rows: Iterable[tuple],
                     to_batch: Callable[[list[tuple]], list[pa.Array]]) -> int:
    """Write `rows` to the Arrow IPC file `path`, ROWS_PER_BATCH rows per record batch (`to_batch` turns a
    list of rows into the schema's columns), atomically: the file appears complete or not at all, and a full
    disk is a UserError naming it. Returns the number of rows."""
    from streamtrain.dataset import atomic_write_with, naming_full_disk

    path = Path(path)
    written = 0

    def write(f) -> None:
        nonlocal written
        with pa.ipc.new_file(f, schema) as writer:
            pending: list[tuple] = []
            for row in rows:
                pending.append(row)
                if len(pending) >= ROWS_PER_BATCH:
                    writer.write_batch(pa.record_batch(to_batch(pending), schema=schema))
                    written += len(pending)
                    pending = []
            if pending:
                writer.write_batch(pa.record_batch(to_batch(pending), schema=schema))
                written += len(pending)

    with naming_full_disk(path):
        atomic_write_with(path, write)
    return written
