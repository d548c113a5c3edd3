"""The datasets a ShardStream reads (one, or several mixed by weight): global ids, positions and units.

Global ids number the sources' sequences in the order the sources are given, so with one source an id is
the dataset id. Positions index the stream's id list (each source's ids, after the previous source's);
a unit is the position range of one shard's rows, the piece the epoch plan shuffles and windows.
Mixing (`epoch_units`): each epoch takes from source s its share w_s / sum(w) of the epoch's real tokens
(by default as many as all sources hold together): whole passes over s, then units in a seeded order until
the share is reached, the last one cut at a sequence boundary. An up-sampled source repeats units (each
copy lands in its own place of the epoch's shuffled unit order); a down-sampled one leaves out other units
in every epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from streamtrain.data.bucketing import Items, window_items
from streamtrain.dataset import Index
from streamtrain.dataset.checksums import check_size, verified_lengths
from streamtrain.errors import DataError, UserError
from streamtrain.storage.cache import ShardCache, parse_bytes
from streamtrain.storage.location import Location, is_remote

__all__ = ["Source", "SourceSet", "EpochUnits", "parse_sources", "open_cache", "stored_histogram", "check_shard_files"]


@dataclass
class Source:
    """One dataset of a stream. `ids`: the local ids it contributes (sorted), None for all."""

    index: Index
    weight: float
    id_base: int  # global id of its sequence 0
    pos_base: int  # stream position of its first id
    ids: np.ndarray | None
    num_positions: int


@dataclass(frozen=True)
class EpochUnits:
    """The units of one epoch, in dataset order (the plan shuffles them): position ranges, the shard each
    belongs to (global shard number: sources' shards in order), and the base unit it is (or -1 for a unit
    cut short by mixing)."""

    starts: np.ndarray
    stops: np.ndarray
    shards: np.ndarray
    base: np.ndarray


class SourceSet:
    """The sources of a stream, their lengths (memory-mapped, checked with `verify`) and their units."""

    def __init__(self, indexes: list[Index], weights: list[float], ids: np.ndarray | None, verify: bool):
        if len(indexes) != len(weights):
            raise UserError(f"{len(indexes)} sources but {len(weights)} weights")
        if ids is not None and len(indexes) > 1:
            raise UserError("ids select sequences of one dataset; with several sources give each its own split")
        dims = {ix.dim for ix in indexes}
        if len(dims) > 1:
            raise UserError("mixed sources must have vectors of one width, got dims " + ", ".join(map(str, sorted(dims))))
        self.verify = verify
        self.sources: list[Source] = []
        id_base = pos_base = 0
        for ix, w in zip(indexes, weights):
            n = ix.num_sequences if ids is None else len(ids)
            self.sources.append(Source(ix, float(w), id_base, pos_base, ids, n))
            id_base += ix.num_sequences
            pos_base += n
        self.num_positions = pos_base
        self.num_sequences = id_base
        self._lengths: list[np.ndarray | None] = [None] * len(self.sources)
        self._pos_bases = np.array([s.pos_base for s in self.sources] + [pos_base], dtype=np.int64)
        self._id_bases = np.array([s.id_base for s in self.sources] + [id_base], dtype=np.int64)
        self._shard_bases = np.cumsum([0] + [len(s.index.shards) for s in self.sources]).astype(np.int64)
        self.unit_starts, self.unit_stops, self.unit_shards = self._units()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lengths"] = [None] * len(self.sources)  # maps are per process
        return state

    @property
    def mixed(self) -> bool:
        return len(self.sources) > 1

    def shard_info(self, shard: int):
        """(source number, Index of that source, shard number within it) of a global shard number."""
        s = int(np.searchsorted(self._shard_bases, shard, side="right") - 1)
        return s, self.sources[s].index, shard - int(self._shard_bases[s])

    # -- lengths and rows -----------------------------------------------------------------------------

    def lengths(self, s: int) -> np.ndarray:
        """Source s's lengths file (every local id), memory-mapped."""
        if self._lengths[s] is None:
            ix = self.sources[s].index
            self._lengths[s] = verified_lengths(ix) if self.verify else ix.lengths()
        return self._lengths[s]

    def _source_of_positions(self, a: int, b: int) -> int:
        s = int(np.searchsorted(self._pos_bases, a, side="right") - 1)
        if b > self._pos_bases[s + 1]:
            raise ValueError(f"positions [{a}, {b}) cross a source boundary")
        return s

    def local_ids(self, a: int, b: int) -> tuple[int, np.ndarray]:
        """(source, local ids) of positions [a, b) (they lie in one source)."""
        s = self._source_of_positions(a, b)
        src = self.sources[s]
        lo, hi = a - src.pos_base, b - src.pos_base
        return s, (np.arange(lo, hi, dtype=np.int64) if src.ids is None else src.ids[lo:hi])

    def lengths_of(self, a: int, b: int) -> np.ndarray:
        """Sequence lengths of positions [a, b)."""
        s = self._source_of_positions(a, b)
        src = self.sources[s]
        lo, hi = a - src.pos_base, b - src.pos_base
        lengths = self.lengths(s)
        return lengths[lo:hi] if src.ids is None else lengths[src.ids[lo:hi]]

    def rows_of(self, a: int, b: int, max_len: int) -> Items:
        """The items (windows of at most max_len vectors) of positions [a, b), with global ids."""
        s, local = self.local_ids(a, b)
        return window_items(self.lengths_of(a, b), max_len, local + self.sources[s].id_base)

    def source_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """Source number of each global id."""
        return np.searchsorted(self._id_bases, ids, side="right") - 1

    def split_ids(self, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """For global ids: [(source, indices of the ids in that source)] over the sources they touch."""
        src = self.source_of_ids(ids)
        return [(int(s), np.flatnonzero(src == s)) for s in np.unique(src).tolist()]

    def to_local(self, s: int, ids: np.ndarray) -> np.ndarray:
        return ids - self.sources[s].id_base

    # -- units ----------------------------------------------------------------------------------------

    def _units(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        starts, stops, shards = [], [], []
        for s, src in enumerate(self.sources):
            offsets = src.index.shard_offsets  # local id of each shard's first row, then num_sequences
            cut = offsets if src.ids is None else np.searchsorted(src.ids, offsets)
            for k in range(len(src.index.shards)):
                if cut[k + 1] > cut[k]:
                    starts.append(src.pos_base + int(cut[k]))
                    stops.append(src.pos_base + int(cut[k + 1]))
                    shards.append(int(self._shard_bases[s]) + k)
        return (np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64),
                np.asarray(shards, dtype=np.int64))

    def unit_source(self) -> np.ndarray:
        """Source number of each base unit."""
        return np.searchsorted(self._pos_bases, self.unit_starts, side="right") - 1

    def epoch_units(self, seed: int, epoch: int, unit_tokens: np.ndarray, max_len: int,
                    epoch_tokens: int | None = None) -> EpochUnits:
        """The epoch's units: every base unit once when there is one source; with several, each source's
        share of the epoch's tokens (see the module docstring). `unit_tokens`: real tokens of each base
        unit's items (windows counted as the plan sees them)."""
        n = len(self.unit_starts)
        base = np.arange(n, dtype=np.int64)
        if not self.mixed:
            return EpochUnits(self.unit_starts, self.unit_stops, self.unit_shards, base)
        unit_src = self.unit_source()
        source_tokens = np.bincount(unit_src, weights=unit_tokens, minlength=len(self.sources))
        total = float(source_tokens.sum()) if epoch_tokens is None else float(epoch_tokens)
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        targets = total * weights / weights.sum()
        starts, stops, shards, bases = [], [], [], []
        for s in range(len(self.sources)):
            mine = base[unit_src == s]
            if source_tokens[s] == 0 or targets[s] <= 0:
                continue
            passes = int(targets[s] // source_tokens[s])
            for _ in range(passes):
                starts.append(self.unit_starts[mine]), stops.append(self.unit_stops[mine])
                shards.append(self.unit_shards[mine]), bases.append(mine)
            left = targets[s] - passes * source_tokens[s]
            order = mine[np.random.default_rng([seed, epoch, s, 0x313]).permutation(len(mine))]
            cum = np.cumsum(unit_tokens[order])
            whole = int(np.searchsorted(cum, left, side="right"))  # units that fit entirely
            taken = order[:whole]
            starts.append(self.unit_starts[taken]), stops.append(self.unit_stops[taken])
            shards.append(self.unit_shards[taken]), bases.append(taken)
            rest = left - (cum[whole - 1] if whole else 0.0)
            if whole < len(order) and rest > 0:
                u = int(order[whole])
                a, b = int(self.unit_starts[u]), int(self.unit_stops[u])
                item_tokens = self._sequence_tokens(a, b, max_len)
                cut = int(np.searchsorted(np.cumsum(item_tokens), rest, side="left")) + 1  # sequences to reach it
                cut = min(cut, b - a)
                starts.append(np.array([a])), stops.append(np.array([a + cut]))
                shards.append(np.array([self.unit_shards[u]])), bases.append(np.array([-1]))
        cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
        return EpochUnits(cat(starts), cat(stops), cat(shards), cat(bases))

    def _sequence_tokens(self, a: int, b: int, max_len: int) -> np.ndarray:
        """Real tokens each sequence of positions [a, b) puts into the plan (its windows overlap by one)."""
        lengths = np.asarray(self.lengths_of(a, b), dtype=np.int64)
        stride = max_len - 1
        windows = np.maximum(1, -(-(lengths - 1) // stride))
        return lengths + (windows - 1)


def open_cache(root, cache_dir, cache_limit, storage_options, prefetch_threads=None) -> ShardCache | None:
    """The cache of a source given as a URL (None for a local folder)."""
    if not is_remote(str(root)):
        return None
    limit = None if cache_limit is None else parse_bytes(cache_limit)
    return ShardCache(Location.of(str(root), storage_options), cache_dir, limit, prefetch_threads=prefetch_threads)


def parse_sources(root) -> tuple[list, list[float]]:
    """(roots, weights) of `root`: one folder (weight 1), or a list of (folder, weight)."""
    if isinstance(root, (str, os.PathLike)):
        return [root], [1.0]
    pairs = list(root)
    if not pairs:
        raise UserError("no dataset given")
    roots, weights = [], []
    for item in pairs:
        if isinstance(item, (str, os.PathLike)):
            folder, weight = item, 1.0
        else:
            folder, weight = item
        if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight > 0):
            raise UserError(f"{folder}: weight must be a finite number > 0, got {weight!r}")
        roots.append(folder)
        weights.append(float(weight))
    return roots, weights


def stored_histogram(index: Index, stored) -> tuple[np.ndarray, np.ndarray]:
    """index.json's length histogram, checked against its own counts (it is input like any other)."""
    where = f"{index.root / 'index.json'}: key 'length_histogram'"
    try:
        values = np.asarray(stored["lengths"], dtype=np.int64)
        counts = np.asarray(stored["counts"], dtype=np.int64)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise DataError(f"{where} must hold two lists of integers, 'lengths' and 'counts'") from None
    if (values.ndim != 1 or values.shape != counts.shape or (len(values) and (values.min() < 0 or counts.min() < 0))
            or int(counts.sum()) != index.num_sequences or int((values * counts).sum()) != index.num_tokens):
        raise DataError(f"{where} disagrees with num_sequences/num_tokens; re-convert the dataset")
    return values, counts


def check_shard_files(index: Index) -> None:
    """Every shard of a local dataset is there at its index.json size (hashing is `checksums`' business)."""
    for info in index.shards:
        path = index.root / info.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{path}: shard file is missing") from None
        check_size(path, size, info.bytes)
