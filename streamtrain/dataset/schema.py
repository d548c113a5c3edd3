"""The shard format: file names, the Arrow schema of a shard, and building a shard table.

A dataset is a folder: index.json (written last, atomically), a lengths file, shards/*.arrow (Arrow IPC
*file* format, memory-mappable) and rejects.jsonl when anything was rejected. Each shard row is one
sequence: `sequence` large_list<fixed_size_list<float32, DIM>>, `length` int32, and the provenance
`path` (string) and `line` (int64). A sequence's global id is its position: shard order, then row order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "INDEX_FILE", "LENGTHS_FILE", "REJECTS_FILE", "SHARD_DIR",
           "shard_schema", "shard_name", "sequences_to_table"]

FORMAT_NAME = "streamtrain-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
LENGTHS_FILE = "lengths.npy"
REJECTS_FILE = "rejects.jsonl"
SHARD_DIR = "shards"


def shard_schema(dim: int) -> pa.Schema:
    """Arrow schema of every shard of a dataset of `dim`-wide vectors."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return pa.schema(
        [
            pa.field("sequence", pa.large_list(pa.list_(pa.float32(), dim)), nullable=False),
            pa.field("length", pa.int32(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("line", pa.int64(), nullable=False),
        ],
        metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "dim": str(dim)},
    )


def shard_name(number: int) -> str:
    """Relative path of shard `number` inside a dataset folder."""
    return f"{SHARD_DIR}/shard-{number:06d}.arrow"


def sequences_to_table(
    values: np.ndarray, lengths: np.ndarray, paths: list[str], lines: np.ndarray, dim: int
) -> pa.Table:
    """Build a shard table from concatenated vectors `values` (sum(lengths), dim) float32; ValueError when
    the pieces do not describe the same rows."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, dim)
    lengths = np.asarray(lengths, dtype=np.int64)
    lines = np.asarray(lines, dtype=np.int64)
    if values.shape[0] != int(lengths.sum()):
        raise ValueError(f"values and lengths disagree: {values.shape[0]} vectors, lengths sum to {int(lengths.sum())}")
    if len(paths) != len(lengths) or len(lines) != len(lengths):
        raise ValueError(f"{len(lengths)} lengths but {len(paths)} paths and {len(lines)} lines")
    if len(lengths) and lengths.min() < 0:
        raise ValueError("a sequence length is negative")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    vectors = pa.FixedSizeListArray.from_arrays(_numeric_array(values.reshape(-1), pa.float32()), dim)
    sequence = pa.LargeListArray.from_arrays(_numeric_array(offsets, pa.int64()), vectors)
    return pa.Table.from_arrays(
        [sequence, _numeric_array(lengths, pa.int32()), _string_array(paths), _numeric_array(lines, pa.int64())],
        schema=shard_schema(dim),
    )


# pa.array() imports pandas on its first call (to ask whether its argument is a pandas object): ~0.4 s of
# CPU in every convert worker, more than converting megabytes takes. Arrays built from their buffers never do.
_NUMPY_TYPES = {pa.float32(): np.float32, pa.int32(): np.int32, pa.int64(): np.int64}


def _numeric_array(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=_NUMPY_TYPES[type_])
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)])


def _string_array(strings: list[str]) -> pa.Array:
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    if offsets[-1] >= 2**31:  # beyond a string array's int32 offsets: let pyarrow choose
        return pa.array(strings, type=pa.string())
    return pa.Array.from_buffers(pa.string(), len(encoded),
                                 [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))])
