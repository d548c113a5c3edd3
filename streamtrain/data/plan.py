"""The epoch plan with locality: batches formed inside windows of consecutive reading units (shards)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from streamtrain.data.bucketing import Items, window_items

__all__ = ["BatchRows", "EpochPlan", "unit_bucket_counts", "bucket_lookup"]

# Rows of the positions [start, stop) of the stream's id list, windowed, in position order.
RowsOf = Callable[[int, int], Items]


@dataclass(frozen=True)
class BatchRows:
    """The rows of one batch: int64 arrays of global ids, window offsets and lengths, and the padded T."""

    ids: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    padded_len: int

    def __len__(self) -> int:
        return len(self.ids)


def bucket_lookup(bounds: np.ndarray, pad_multiple: int) -> np.ndarray:
    """int16 table: bucket of an item of length L is table[ceil(L / pad_multiple)] (bounds are multiples of
    pad_multiple), one gather per item instead of a binary search."""
    bounds = np.asarray(bounds, dtype=np.int64)
    if (bounds % pad_multiple).any():
        raise ValueError(f"bucket bounds must be multiples of pad_multiple={pad_multiple}")
    rounded = np.arange(int(bounds[-1]) // pad_multiple + 1, dtype=np.int64) * pad_multiple
    return np.searchsorted(bounds, np.maximum(rounded, 1)).astype(np.int16)


def _buckets(lengths: np.ndarray, lookup: np.ndarray, pad_multiple: int) -> np.ndarray:
    rounded = -(-np.asarray(lengths, dtype=np.int64) // pad_multiple)
    if len(rounded) and rounded.max() >= len(lookup):
        raise ValueError(f"an item of length {int(lengths.max())} exceeds the largest bucket bound")
    return lookup[rounded]


def unit_bucket_counts(
    lengths_of: Callable[[int, int], np.ndarray],
    unit_starts: np.ndarray,
    unit_stops: np.ndarray,
    lookup: np.ndarray,
    pad_multiple: int,
    max_len: int,
    chunk_positions: int = 1 << 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Items per unit and bucket (int64 (U, nb)) and real tokens per unit (int64 (U,)), from the sequence
    lengths of each unit's positions (`lengths_of(start, stop)`), counting sequences longer than max_len as
    the windows `bucketing.window_items` cuts them into (n - 1 full windows and a last one), without making
    them. Runs of adjacent units are done together, about `chunk_positions` lengths at a time: one pass over
    the lengths in a few vector operations per chunk, with memory bounded by the chunk."""
    nb = int(lookup.max()) + 1
    starts = np.asarray(unit_starts, dtype=np.int64)
    stops = np.asarray(unit_stops, dtype=np.int64)
    U = len(starts)
    counts = np.zeros((U, nb), dtype=np.int64)
    tokens = np.zeros(U, dtype=np.int64)
    stride = max_len - 1
    # bucket of an item by its length, one gather per item (no division): lengths past the largest bound
    # map to nb, which `_check_items` reports
    by_length = np.full(max_len + 1, nb, dtype=np.int16)
    reach = min(max_len, (len(lookup) - 1) * pad_multiple)
    by_length[: reach + 1] = lookup[-(-np.arange(reach + 1) // pad_multiple)]
    u = 0
    while u < U:
        v = u + 1
        while v < U and starts[v] == stops[v - 1] and stops[v] - starts[u] <= chunk_positions:
            v += 1
        try:
            lengths = np.asarray(lengths_of(int(starts[u]), int(stops[v - 1])))
        except ValueError:  # the run crosses from one source into the next
            v = u + 1
            lengths = np.asarray(lengths_of(int(starts[u]), int(stops[u])))
        edges = np.concatenate([[0], np.cumsum(stops[u:v] - starts[u:v])])
        long = np.flatnonzero(lengths > max_len)
        item_len = lengths
        extra = np.zeros(v - u, np.int64)
        if len(long):
            item_len = lengths.astype(np.int64)
            windows = -(-(item_len[long] - 1) // stride)
            item_len[long] -= (windows - 1) * stride  # the last window; the others are full
            np.add.at(extra, np.searchsorted(edges, long, side="right") - 1, windows - 1)
        buckets = by_length[item_len]
        if len(buckets) and int(buckets.max()) >= nb:
            raise ValueError(f"an item of length {int(item_len[buckets >= nb].max())} exceeds the largest bucket bound")
        for k in range(v - u):
            counts[u + k] = np.bincount(buckets[edges[k] : edges[k + 1]], minlength=nb)
        if len(long):
            counts[u:v, by_length[max_len]] += extra
        nonempty = edges[:-1] < edges[1:]
        sums = np.add.reduceat(item_len, edges[:-1][nonempty], dtype=np.int64) if len(item_len) else np.zeros(0, np.int64)
        tokens[u:v][nonempty] = sums
        tokens[u:v] += extra * max_len
        u = v
    return counts, tokens


@dataclass
class _Simulation:
    """Counts of every window of an epoch, per bucket (int64 (J, nb) each)."""

    carry_in: np.ndarray  # items carried into window j from earlier windows
    carry_from: np.ndarray  # the window of the oldest carried item (j when nothing is carried)
    full: np.ndarray  # full batches window j emits
    partial: np.ndarray  # size of the smaller batch window j emits (0: none)
    batch_starts: np.ndarray  # (J + 1,) first epoch batch of each window


def _simulate(window_counts: np.ndarray, per_batch: np.ndarray, span: int) -> _Simulation:
    """Bucket by bucket, the stream of items window after window, cut into batches of per_batch items. The
    incomplete remainder (r items, the oldest from window o) is carried on while a batch holding it would
    read at most `span` consecutive windows; otherwise it is emitted as a smaller batch."""
    J, nb = window_counts.shape
    carry_in = np.zeros((J, nb), np.int64)
    carry_from = np.zeros((J, nb), np.int64)
    full = np.zeros((J, nb), np.int64)
    partial = np.zeros((J, nb), np.int64)
    r = np.zeros(nb, np.int64)
    o = np.zeros(nb, np.int64)
    for j in range(J):
        carry_in[j], carry_from[j] = r, np.where(r > 0, o, j)
        total = r + window_counts[j]
        full[j] = total // per_batch
        rest = total - full[j] * per_batch
        # where a batch closed, the remainder holds this window's items only
        o = np.where((full[j] > 0) | (r == 0), j, o)
        if j == J - 1:
            partial[j], r = rest, np.zeros(nb, np.int64)
            continue
        forced = (rest > 0) & (o <= j + 1 - span)
        partial[j] = np.where(forced, rest, 0)
        r = np.where(forced, 0, rest)
    per_window = full.sum(axis=1) + (partial > 0).sum(axis=1)
    return _Simulation(carry_in, carry_from, full, partial,
                       np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64))


# A batch that merges the remainders of several buckets pads every row to the longest one's bound: it may
# take buckets up to this many times the bound of its first, so merging trades a little padding (at most a
# fifth of such a batch) for far fewer, fuller batches. On the real corpus at the default window (8192-token
# budget): padding 3.3% -> 4.0%, batches 79% -> 95% full; ratio 2 gave 4.2% and 96%, but 25% padding with
# one small shard per window (benchmarks/bench_plan.py).
MERGE_RATIO = 1.25


def _pack_remainders(partial: np.ndarray, per_batch: np.ndarray, bounds: np.ndarray) -> list[tuple[int, list[tuple[int, int]]]]:
    """The batches one window's remainders (partial[b] items of bucket b, emitted now) form: buckets in
    ascending order share a batch while its bound stays within MERGE_RATIO of the first's and its rows fit
    the budget at the highest bound (per_batch of that bucket). [(bucket of the batch's T, [(bucket, items)])]."""
    batches: list[tuple[int, list[tuple[int, int]]]] = []
    members: list[tuple[int, int]] = []
    rows = 0
    first_bound = 0
    top = 0
    for b in np.flatnonzero(partial).tolist():
        left, cap = int(partial[b]), int(per_batch[b])
        if members and (bounds[b] > MERGE_RATIO * first_bound or rows >= cap):
            batches.append((top, members))
            members, rows = [], 0
        while left:
            if not members:
                first_bound = int(bounds[b])
            take = min(left, cap - rows)
            members.append((b, take))
            rows += take
            top = b
            left -= take
            if rows >= cap:
                batches.append((top, members))
                members, rows = [], 0
    if members:
        batches.append((top, members))
    return batches


@dataclass
class _Window:
    """One window's batches: rows grouped by batch segment, and the window's batch order over segments."""

    ids: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    seg_starts: np.ndarray  # (S + 1,)
    padded_len: np.ndarray  # (S,)
    order: np.ndarray  # (S,) segment of the window's k-th batch


class EpochPlan:
    """The batches of one epoch; windows are built on demand (the last few are kept).

    unit_starts, unit_stops: position ranges of the epoch's units in dataset order (a unit may repeat, or
        cover a part of a shard, when sources are mixed); rows_of(start, stop): their items.
    counts, tokens: items per unit and bucket, real tokens per unit (`unit_bucket_counts`), given by the
        caller so that they are computed once per dataset, not once per epoch.
    window: units per window (None or >= the unit count: one window).

    A process needs only the units of the window it reads, and planning costs what the window costs, not what
    the dataset costs. Per epoch (all pure functions of seed, epoch and the unit list; never of where the data
    lives or of the world size):

    1. the unit order is shuffled with `default_rng([seed, epoch])`; runs of `window` consecutive units form
       windows 0, 1, ...;
    2. window j's items are shuffled with `default_rng([seed, epoch, j + 1])` and grouped by bucket (stable);
    3. each bucket's items form a stream: the tail carried from window j - 1 first, then window j's own; it is
       cut into batches of `per_batch[b]` items. An incomplete remainder made of window j's items only is
       carried into window j + 1; one that still holds carried items is emitted now, merged with the other
       buckets' remainders emitted by window j into as few batches as fit (`_pack_remainders`: buckets within
       MERGE_RATIO of each other share a batch, padded to the longest one's bound). So every batch holds rows
       of windows j - 1 and j only, and nearly every batch is full;
    4. window j's batches are put in a shuffled order (the same generator), and the windows follow each other.

    The number of batches of an epoch comes from a simulation over per-unit bucket counts (`unit_bucket_counts`),
    without building any window; it may differ slightly from epoch to epoch (forced remainders depend on the
    unit order). With shuffle=False the units, items and batches keep dataset order. With one window holding
    every unit, this is the global plan of `bucketing.plan_epoch` (a different draw, the same guarantees).
    """


    def __init__(
        self,
        rows_of: RowsOf,
        unit_starts: np.ndarray,
        unit_stops: np.ndarray,
        counts: np.ndarray,
        tokens: np.ndarray,
        bounds: np.ndarray,
        max_tokens: int,
        seed: int,
        epoch: int,
        *,
        shuffle: bool = True,
        window: int | None = None,
        pad_multiple: int = 8,
        max_sequences: int | None = None,
        span: int = 2,
        tags: np.ndarray | None = None,
    ):
        if span < 1:
            raise ValueError(f"span must be >= 1 window, got {span}")
        self.bounds = np.asarray(bounds, dtype=np.int64)
        if self.bounds[-1] > max_tokens:
            raise ValueError(f"bucket bound {self.bounds[-1]} exceeds max_tokens={max_tokens}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 unit, got {window}")
        self._rows_of = rows_of
        self.seed, self.epoch, self.shuffle = int(seed), int(epoch), bool(shuffle)
        self.pad_multiple = int(pad_multiple)
        self._lookup = bucket_lookup(self.bounds, self.pad_multiple)
        per_batch = max_tokens // self.bounds
        if max_sequences is not None:
            per_batch = np.minimum(per_batch, max_sequences)
        self.per_batch = per_batch.astype(np.int64)

        n_units = len(unit_starts)
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(n_units) if shuffle
                 else np.arange(n_units, dtype=np.int64))
        self.window = n_units if window is None or window >= n_units else int(window)
        self.unit_starts = np.asarray(unit_starts, dtype=np.int64)[order]
        self.unit_stops = np.asarray(unit_stops, dtype=np.int64)[order]
        self.unit_tags = (np.arange(n_units, dtype=np.int64) if tags is None else np.asarray(tags, dtype=np.int64))[order]
        counts = np.asarray(counts, dtype=np.int64)[order]
        tokens = np.asarray(tokens, dtype=np.int64)[order]
        self.num_windows = -(-n_units // self.window) if n_units else 0
        win_of_unit = np.arange(n_units) // max(self.window, 1)
        nb = len(self.bounds)
        window_counts = np.zeros((self.num_windows, nb), np.int64)
        if n_units:
            np.add.at(window_counts, win_of_unit, counts)
        self.span = int(span)
        self._sim = _simulate(window_counts, self.per_batch, self.span)
        # each window's remainders, merged into few batches (`_pack_remainders`)
        self._merged = [_pack_remainders(self._sim.partial[j], self.per_batch, self.bounds) for j in range(self.num_windows)]
        per_window = self._sim.full.sum(axis=1) + np.array([len(m) for m in self._merged], dtype=np.int64)
        self._sim.batch_starts = np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64)
        self.real_tokens = int(tokens.sum())
        batches_per_bucket = self._sim.full.sum(axis=0)
        self.padded_tokens = int((batches_per_bucket * self.per_batch * self.bounds).sum()
                                 + sum(sum(n for _, n in members) * int(self.bounds[top])
                                       for merged in self._merged for top, members in merged))
        self._keep = self.span + 1  # windows whose lists are kept: a window's carried items reach back span - 1
        self._lists: OrderedDict[int, tuple[Items, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[int, _Window] = OrderedDict()

    # -- sizes ----------------------------------------------------------------------------------------

    @property
    def num_batches(self) -> int:
        return int(self._sim.batch_starts[-1])

    @property
    def pad_fraction(self) -> float:
        """Share of the epoch's padded tokens (sum of B * T) that are padding."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def shapes(self) -> dict[tuple[int, int], int]:
        """{(B, T): number of batches} over the epoch, without building any window."""
        out: dict[tuple[int, int], int] = {}
        for b, T in enumerate(self.bounds.tolist()):
            n_full = int(self._sim.full[:, b].sum())
            if n_full:
                out[(int(self.per_batch[b]), T)] = out.get((int(self.per_batch[b]), T), 0) + n_full
        for merged in self._merged:
            for top, members in merged:
                shape = (sum(n for _, n in members), int(self.bounds[top]))
                out[shape] = out.get(shape, 0) + 1
        return out

    def window_of(self, batch: int) -> int:
        """The window epoch batch `batch` belongs to."""
        return int(np.searchsorted(self._sim.batch_starts, batch, side="right") - 1)

    def window_units(self, j: int) -> list[tuple[int, int]]:
        """Position ranges of the units whose rows window j's batches read: window j's own and those of the
        earlier windows (at most span - 1) that items carried into j come from."""
        lo = int(self._sim.carry_from[j].min()) * self.window if self.num_windows else 0
        hi = min(len(self.unit_starts), (j + 1) * self.window)
        return list(zip(self.unit_starts[lo:hi].tolist(), self.unit_stops[lo:hi].tolist()))

    def window_tags(self, j: int) -> list[int]:
        """The tags (e.g. shard numbers) of the units window j's batches read, as `window_units`."""
        lo = int(self._sim.carry_from[j].min()) * self.window if self.num_windows else 0
        hi = min(len(self.unit_starts), (j + 1) * self.window)
        return self.unit_tags[lo:hi].tolist()

    def window_starts(self) -> np.ndarray:
        """(num_windows + 1,) the first epoch batch of each window, then num_batches."""
        return self._sim.batch_starts

    def sample_rows(self, size: int, padded_len: int) -> BatchRows:
        """Up to `size` items of the bucket of `padded_len`, from the first windows that hold some: rows of
        the epoch's real data with that shape, for timing a step (not a batch of the epoch)."""
        b = int(np.searchsorted(self.bounds, padded_len))
        if b >= len(self.bounds) or self.bounds[b] != padded_len:
            raise ValueError(f"{padded_len} is not a bucket bound of this plan")
        parts: list[tuple[Items, int, int]] = []
        got = 0
        for j in range(self.num_windows):
            items, bounds = self._bucket_lists(j)
            a, e = int(bounds[b]), int(bounds[b + 1])
            take = min(e - a, size - got)
            if take > 0:
                parts.append((items, a, a + take))
                got += take
            if got >= size:
                break
        cat = lambda f: np.concatenate([f(i)[a:e] for i, a, e in parts]) if parts else np.zeros(0, np.int64)  # noqa: E731
        return BatchRows(cat(lambda i: i.ids), cat(lambda i: i.offsets), cat(lambda i: i.lengths), padded_len)

    # -- batches --------------------------------------------------------------------------------------

    def batch(self, b: int) -> BatchRows:
        """Epoch batch `b` (0 <= b < num_batches)."""
        if not 0 <= b < self.num_batches:
            raise IndexError(f"batch {b} out of range [0, {self.num_batches})")
        j = self.window_of(b)
        w = self._window(j)
        s = int(w.order[b - int(self._sim.batch_starts[j])])
        a, e = int(w.seg_starts[s]), int(w.seg_starts[s + 1])
        return BatchRows(w.ids[a:e], w.offsets[a:e], w.lengths[a:e], int(w.padded_len[s]))

    def _bucket_lists(self, j: int) -> tuple[Items, np.ndarray]:
        """Window j's own items grouped by bucket (shuffled within) and the (nb + 1,) bucket boundaries."""
        cached = self._lists.get(j)
        if cached is not None:
            self._lists.move_to_end(j)
            return cached
        lo, hi = j * self.window, min(len(self.unit_starts), (j + 1) * self.window)
        parts = [self._rows_of(a, e) for a, e in zip(self.unit_starts[lo:hi].tolist(), self.unit_stops[lo:hi].tolist())]
        ids = np.concatenate([p.ids for p in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.concatenate([p.offsets for p in parts]) if parts else np.zeros(0, np.int64)
        lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64)
        n = len(ids)
        perm = (np.random.default_rng([self.seed, self.epoch, j + 1]).permutation(n) if self.shuffle
                else np.arange(n, dtype=np.int64))
        bucket = _buckets(lengths[perm], self._lookup, self.pad_multiple)
        perm = perm[np.argsort(bucket, kind="stable")]
        nb = len(self.bounds)
        bounds = np.concatenate([[0], np.cumsum(np.bincount(bucket, minlength=nb))]).astype(np.int64)
        items = Items(ids[perm], offsets[perm], lengths[perm])
        self._lists[j] = (items, bounds)
        while len(self._lists) > self._keep:
            self._lists.popitem(last=False)
        return items, bounds

    def _carried(self, j: int, b: int, q: int) -> list[tuple[Items, int, int]]:
        """The last q items of bucket b's stream before window j, as (items, start, stop) slices in stream
        order: from the end of window j - 1's list backwards, into earlier windows while needed."""
        out = []
        w = j - 1
        while q > 0:
            items, bounds = self._bucket_lists(w)
            a, e = int(bounds[b]), int(bounds[b + 1])
            n = min(q, e - a)
            if n:
                out.append((items, e - n, e))
            q -= n
            w -= 1
        return out[::-1]

    def _window(self, j: int) -> _Window:
        cached = self._windows.get(j)
        if cached is not None:
            self._windows.move_to_end(j)
            return cached
        sim = self._sim
        own, own_bounds = self._bucket_lists(j)
        pick_ids, pick_offsets, pick_lengths, seg_sizes, seg_len = [], [], [], [], []
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        remainders: dict[int, list[np.ndarray]] = {}  # bucket -> [ids, offsets, lengths] of its remainder
        for b in range(len(self.bounds)):
            q = int(sim.carry_in[j, b])
            n_full = int(sim.full[j, b] * self.per_batch[b])
            take = n_full + int(sim.partial[j, b])
            if take == 0:
                continue
            srcs = self._carried(j, b, q)
            start = int(own_bounds[b])
            srcs.append((own, start, start + take - q))
            picked = [cat([items.ids[a:e] for items, a, e in srcs]), cat([items.offsets[a:e] for items, a, e in srcs]),
                      cat([items.lengths[a:e] for items, a, e in srcs])]
            pick_ids.append(picked[0][:n_full])
            pick_offsets.append(picked[1][:n_full])
            pick_lengths.append(picked[2][:n_full])
            seg_sizes.extend([int(self.per_batch[b])] * int(sim.full[j, b]))
            seg_len.extend([int(self.bounds[b])] * int(sim.full[j, b]))
            if sim.partial[j, b]:
                remainders[b] = [a[n_full:] for a in picked]
        used = dict.fromkeys(remainders, 0)
        for top, members in self._merged[j]:
            for b, n in members:
                a = used[b]
                pick_ids.append(remainders[b][0][a : a + n])
                pick_offsets.append(remainders[b][1][a : a + n])
                pick_lengths.append(remainders[b][2][a : a + n])
                used[b] = a + n
            seg_sizes.append(sum(n for _, n in members))
            seg_len.append(int(self.bounds[top]))
        num_segments = len(seg_sizes)
        # unshuffled: buckets ascending (merged remainders among the full batches of their bound)
        order = (np.random.default_rng([self.seed, self.epoch, j + 1, 1]).permutation(num_segments) if self.shuffle
                 else np.argsort(np.asarray(seg_len, dtype=np.int64), kind="stable"))
        w = _Window(cat(pick_ids), cat(pick_offsets), cat(pick_lengths),
                    np.concatenate([[0], np.cumsum(seg_sizes)]).astype(np.int64),
                    np.asarray(seg_len, dtype=np.int64), order)
        self._windows[j] = w
        while len(self._windows) > 2:
            self._windows.popitem(last=False)
        return w
