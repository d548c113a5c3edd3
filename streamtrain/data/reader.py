"""Memory-mapped access to a dataset's shards: global sequence id -> (T, D) numpy view, no copy."""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from streamtrain.dataset import Index, map_file, read_index, read_shard
from streamtrain.dataset.checksums import check_mapped, check_size, verified_lengths
from streamtrain.errors import DataError

__all__ = ["ShardReader", "sequence_views", "DEFAULT_MAX_OPEN_SHARDS"]

# Maps are cheap to hold (no file descriptor, address space only, pages the kernel may reclaim), and a
# shuffled batch takes rows from many shards, so a dataset with more shards than this re-maps some at
# nearly every batch: the bound is for the map count (vm.max_map_count, 65530 by default), not a cache size.
DEFAULT_MAX_OPEN_SHARDS = 1024


@dataclass
class _ShardViews:
    chunk_first_row: list[int]  # first shard row of each record batch
    row_offsets: list[np.ndarray]  # per record batch: int64 (rows + 1,) vector offsets into `vectors`
    vectors: list[np.ndarray]  # per record batch: float32 (num_vectors, D) view into the map
    raw: list[memoryview] = field(init=False)  # per record batch: the same bytes, for gather's row copies

    def __post_init__(self) -> None:
        self.raw = [memoryview(v).cast("B") for v in self.vectors]

    def locate(self, row: int) -> tuple[np.ndarray, int, int]:
        """(vectors, start, end) of shard row `row`."""
        c = 0 if len(self.chunk_first_row) == 1 else bisect.bisect_right(self.chunk_first_row, row) - 1
        offsets = self.row_offsets[c]
        r = row - self.chunk_first_row[c]
        return self.vectors[c], int(offsets[r]), int(offsets[r + 1])


def sequence_views(table: pa.Table, dim: int, name: str = "shard") -> _ShardViews:
    """Zero-copy views of the `sequence` column of a shard table (any number of record batches)."""
    try:
        column = table.column("sequence")
    except KeyError:
        raise DataError(f"{name}: no 'sequence' column") from None
    t = column.type
    if not (
        (pa.types.is_large_list(t) or pa.types.is_list(t))
        and pa.types.is_fixed_size_list(t.value_type)
        and t.value_type.list_size == dim
        and t.value_type.value_type == pa.float32()
    ):
        raise DataError(f"{name}: column 'sequence' has type {t}, expected large_list<fixed_size_list<float, {dim}>>")
    offset_dtype = np.int64 if pa.types.is_large_list(t) else np.int32
    first_rows, row_offsets, vectors = [], [], []
    row = 0
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        n = len(chunk)
        offsets = np.frombuffer(chunk.buffers()[1], dtype=offset_dtype)[chunk.offset : chunk.offset + n + 1]
        child = chunk.values  # fixed_size_list array, its own offset applied by the list offsets above
        floats = child.values  # float array backing the child, ignoring the child's offset
        flat = np.frombuffer(floats.buffers()[1], dtype=np.float32)
        begin = floats.offset + child.offset * dim
        end = floats.offset + (child.offset + len(child)) * dim
        if end > len(flat):
            raise DataError(f"{name}: values buffer is shorter than its offsets say (truncated shard?)")
        first_rows.append(row)
        row_offsets.append(offsets.astype(np.int64, copy=False))
        vectors.append(flat[begin:end].reshape(-1, dim))
        row += n
    if not first_rows:  # an empty shard: keep locate() well defined
        first_rows, row_offsets, vectors = [0], [np.zeros(1, np.int64)], [np.zeros((0, dim), np.float32)]
    return _ShardViews(first_rows, row_offsets, vectors)


_ZEROS = memoryview(b"")


def _zeros(n: int) -> memoryview:
    """A read-only view of at least `n` zero bytes (grown on demand, shared: nothing writes to it)."""
    global _ZEROS
    if len(_ZEROS) < n:
        _ZEROS = memoryview(bytes(max(n, 2 * len(_ZEROS))))
    return _ZEROS


class ShardReader:
    """Sequence access by global id over a dataset folder; shards are memory-mapped on first use.

    Every shard is checked when mapped: its size against index.json, with `verify` its sha256 (hashed
    only for a file version not verified before, see `checksums`), its row count against index.json and
    every row's length against the lengths file (itself checked against index.json's lengths_sha256 with
    `verify`). So a shard that is missing, truncated, changed or unreadable raises DataError naming it
    before any of its rows is used.

    `ShardReader` opens shards lazily (on the first request for one of their rows), so it can be pickled into
    DataLoader workers before anything is mapped. Each opened shard is reduced to, per record batch, the
    int64 row offsets of its `sequence` column and a (num_vectors, D) float32 view of the values buffer,
    both taken straight from the Arrow buffers with np.frombuffer (array offsets of the list, of the
    fixed_size_list child and of the float grandchild are all honoured). `gather` copies the rows of a batch
    from the map into a caller's preallocated (B, T, D) array: one memcpy per row, nothing else.

    Open maps are bounded: at most `max_open_shards` per reader, least recently used first out. A map holds no
    file descriptor (`format.map_file` closes it once mapped), and an evicted map is unmapped when its last
    view goes: a `sequence()` view or a batch being gathered keeps it valid, and batches are copies.

    `fetch(s)`, when given, maps shard s instead of `map_file` and returns the same (buffer, stat): a remote
    dataset's cache downloads the file first, and may block.

    Imports pyarrow and numpy only (never torch).
    """

    def __init__(self, root: str | os.PathLike | Index, lengths: np.ndarray | None = None, *, verify: bool = True,
                 max_open_shards: int | None = None, fetch: Callable[[int], object] | None = None):
        self.index = root if isinstance(root, Index) else read_index(root)
        self._fetch = fetch
        self.dim = self.index.dim
        self.verify = bool(verify)
        self.max_open_shards = DEFAULT_MAX_OPEN_SHARDS if max_open_shards is None else int(max_open_shards)
        if self.max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self._shard_first = self.index.shard_offsets  # (S + 1,) int64
        self._shard_first_list = self._shard_first.tolist()
        self._lengths = lengths
        self._own_lengths = False  # loaded here (a map, reopened after unpickling) rather than given
        self._views: OrderedDict[int, _ShardViews] = OrderedDict()  # open shards, least recently used first

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_views"] = OrderedDict()  # maps are per process: reopen after unpickling
        if self._own_lengths:
            state["_lengths"], state["_own_lengths"] = None, False
        return state

    def __len__(self) -> int:
        return self.index.num_sequences

    @property
    def num_open_shards(self) -> int:
        return len(self._views)

    def _lengths_view(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = verified_lengths(self.index) if self.verify else self.index.lengths()
            self._own_lengths = True
        return self._lengths

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """Shard number of each global id."""
        return np.searchsorted(self._shard_first, ids, side="right") - 1

    def _open(self, s: int) -> _ShardViews:
        info = self.index.shards[s]
        path = Path(self.index.root) / info.file
        buffer, stat = map_file(path) if self._fetch is None else self._fetch(s)
        check_size(path, stat.st_size, info.bytes)
        if self.verify:
            check_mapped(path, stat, buffer, info.sha256)
        table = read_shard(buffer, path)
        if table.num_rows != info.num_sequences:
            raise DataError(f"{path}: {table.num_rows} sequences, index.json says {info.num_sequences}")
        views = sequence_views(table, self.dim, str(path))
        stored = np.concatenate([np.diff(o) for o in views.row_offsets]) if info.num_sequences else np.zeros(0)
        first = self._shard_first_list[s]
        expected = self._lengths_view()[first : first + info.num_sequences]
        if len(stored) != len(expected) or not np.array_equal(stored, expected):
            raise DataError(f"{path}: sequence lengths differ from {self.index.lengths_file}; re-convert the dataset")
        if views.vectors and sum(len(v) for v in views.vectors) < int(expected.sum()):
            raise DataError(f"{path}: fewer vectors than its sequence lengths say (truncated shard?)")
        self._views[s] = views
        if len(self._views) > self.max_open_shards:
            self._views.popitem(last=False)  # unmapped once no view of it is left
        return views

    def retain(self, shards) -> None:
        """Unmap every open shard not in `shards` (shard numbers): a remote dataset's reader keeps only the
        shards its current windows read, so the cache's disk space of a shard it evicts is freed (an unlinked
        file stays on disk for as long as it is mapped)."""
        keep = set(shards)
        for s in [s for s in self._views if s not in keep]:
            del self._views[s]

    def _shard(self, s: int) -> _ShardViews:
        views = self._views.get(s)
        if views is None:
            return self._open(s)
        self._views.move_to_end(s)
        return views

    def sequence(self, i: int) -> np.ndarray:
        """Sequence `i` as a read-only (T, D) float32 view into the memory map."""
        if not 0 <= i < self.index.num_sequences:
            raise IndexError(f"sequence id {i} out of range [0, {self.index.num_sequences})")
        s = bisect.bisect_right(self._shard_first_list, i) - 1
        vectors, start, end = self._shard(s).locate(i - self._shard_first_list[s])
        return vectors[start:end]

    def gather(self, out: np.ndarray, ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
               zero_padding: bool = False) -> None:
        """Copy window [offsets[j], offsets[j] + lengths[j]) of sequence ids[j] into out[j, :lengths[j]].

        `out` is (B, T, D). Past each row's length it is zeroed when `zero_padding`, else not touched (for
        an `out` that is zero already): either way every element is written at most once. A window that
        does not fit `out` is a ValueError; one past the end of its sequence a DataError (the lengths the
        windows were planned from disagree with the shard).
        """
        ids = np.asarray(ids, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        width = out.shape[1]
        if not len(ids) == len(offsets) == len(lengths) <= out.shape[0]:
            raise ValueError(f"gather: {len(ids)} ids, {len(offsets)} offsets and {len(lengths)} lengths "
                             f"for an out of {out.shape[0]} rows")
        if len(ids) and not (0 <= lengths.min() and lengths.max() <= width):
            raise ValueError(f"gather: window lengths must be in [0, {width}] (out's T)")
        if len(ids) and not (0 <= ids.min() and ids.max() < self.index.num_sequences):
            raise IndexError(f"gather: sequence ids must be in [0, {self.index.num_sequences})")
        shards = self.shard_of(ids)
        rows = ids - self._shard_first[shards]
        starts = np.asarray(offsets, dtype=np.int64).copy()
        if len(ids) and starts.min() < 0:
            raise ValueError("gather: window offsets must be >= 0")
        ends = np.empty_like(starts)
        # Vectorised per shard and record batch (a batch touches few): where each window starts, and
        # which buffer it is in; the loop below then does nothing but one memcpy per row.
        arrays: list[np.ndarray] = []
        raws: list[memoryview] = []
        source = np.empty(len(ids), dtype=np.int64)
        touched = np.unique(shards).tolist()
        for s in touched:
            views = self._shard(s)
            sel = slice(None) if len(touched) == 1 else np.flatnonzero(shards == s)
            first_rows = views.chunk_first_row
            if len(first_rows) == 1:  # the usual shard: one record batch, its rows numbered from 0
                parts = [(0, sel, rows[sel])]
            else:
                sel = np.arange(len(ids))[sel]
                chunks = np.searchsorted(first_rows, rows[sel], side="right") - 1
                parts = [(c, sel[chunks == c], rows[sel[chunks == c]] - first_rows[c])
                         for c in np.unique(chunks).tolist()]
            for c, csel, local in parts:
                starts[csel] += views.row_offsets[c][local]
                ends[csel] = views.row_offsets[c][local + 1]
                source[csel] = len(arrays)
                arrays.append(views.vectors[c])  # keeps the map valid should the shard be evicted meanwhile
                raws.append(views.raw[c])
        past = np.flatnonzero(starts + lengths > ends)
        if len(past):
            j = int(past[0])
            path = Path(self.index.root) / self.index.shards[int(shards[j])].file
            raise DataError(
                f"{path}: sequence {int(ids[j])} has {int(ends[j] - starts[j] + offsets[j])} vectors, a window "
                f"asks for [{int(offsets[j])}, {int(offsets[j] + lengths[j])}); the lengths it was planned from "
                "disagree with the shard"
            )
        if not (out.flags.c_contiguous and out.dtype == np.float32):  # a caller's strided out: numpy copies
            for j, (a, start, n) in enumerate(zip(source.tolist(), starts.tolist(), lengths.tolist())):
                out[j, :n] = arrays[a][start : start + n]
                if zero_padding and n < width:
                    out[j, n:] = 0
            return
        # Contiguous out: byte ranges of memoryviews, the cheapest copy Python has (no array objects made
        # per row; measured 1.3x the numpy slice assignment per batch here)
        if out.size == 0:  # no vectors to copy (every window is empty)
            return
        row_bytes = self.dim * 4
        dst = memoryview(out).cast("B")
        stride = width * row_bytes
        zero = _zeros(stride) if zero_padding else None
        d = 0
        for a, start, n in zip(source.tolist(), (starts * row_bytes).tolist(), (lengths * row_bytes).tolist()):
            dst[d : d + n] = raws[a][start : start + n]
            if zero is not None and n < stride:
                dst[d + n : d + stride] = zero[: stride - n]
            d += stride
