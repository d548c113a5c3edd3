"""Tests for streamtrain.data.plan: the windowed epoch plan, checked against the items it must cover."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtrain.data.bucketing import bucket_bounds, window_items
from streamtrain.data.plan import EpochPlan, bucket_lookup, unit_bucket_counts


def _lognormal_lengths(n, seed=0):
    rng = np.random.default_rng(seed)
    sigma = np.log(1000 / 30) / 2.326
    return np.maximum(1, np.round(rng.lognormal(np.log(30), sigma, n))).astype(np.int64)


class _Data:
    """Sequences cut into units of consecutive ids (as shards are)."""

    def __init__(self, lengths, unit_sizes, max_len):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_len = max_len
        stops = np.cumsum(unit_sizes)
        self.starts, self.stops = stops - np.asarray(unit_sizes), stops
        assert stops[-1] == len(self.lengths)
        self.items = window_items(self.lengths, max_len)

    def rows_of(self, a, b):
        return window_items(self.lengths[a:b], self.max_len, np.arange(a, b, dtype=np.int64))

    def plan(self, max_tokens=2048, seed=0, epoch=0, window=2, shuffle=True, max_sequences=None, max_shapes=32, span=2):
        bounds = bucket_bounds(self.items.lengths, 8, max_shapes)
        counts, tokens = unit_bucket_counts(lambda a, b: self.lengths[a:b], self.starts, self.stops,
                                            bucket_lookup(bounds, 8), 8, self.max_len)
        return EpochPlan(self.rows_of, self.starts, self.stops, counts, tokens, bounds, max_tokens, seed, epoch,
                         shuffle=shuffle, window=window, max_sequences=max_sequences, span=span)


def _all_batches(plan):
    return [plan.batch(b) for b in range(plan.num_batches)]


def _unit_of(data, ids):
    return np.searchsorted(data.stops, ids, side="right")


def _check_epoch(data, plan, max_tokens):
    batches = _all_batches(plan)
    # every item (sequence id, window offset) exactly once
    got = sorted(zip(np.concatenate([b.ids for b in batches]).tolist(), np.concatenate([b.offsets for b in batches]).tolist()))
    want = sorted(zip(data.items.ids.tolist(), data.items.offsets.tolist()))
    assert got == want
    for b in batches:
        assert len(b) * b.padded_len <= max_tokens
        assert b.lengths.max() <= b.padded_len and b.padded_len in plan.bounds
    # what the plan says about itself without building windows is what building them gives
    shapes = {}
    for b in batches:
        shapes[(len(b), b.padded_len)] = shapes.get((len(b), b.padded_len), 0) + 1
    assert shapes == plan.shapes()
    real = sum(int(b.lengths.sum()) for b in batches)
    padded = sum(len(b) * b.padded_len for b in batches)
    assert plan.real_tokens == real and plan.padded_tokens == padded
    return batches


@given(
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=80),
    unit=st.integers(1, 9),
    window=st.integers(1, 5),
    max_len=st.integers(2, 40),
    seed=st.integers(0, 3),
    shuffle=st.booleans(),
    span=st.integers(1, 4),
)
@settings(max_examples=200, deadline=None)
def test_every_item_once_within_budget_for_any_units_and_window(lengths, unit, window, max_len, seed, shuffle, span):
    n = len(lengths)
    sizes = [unit] * (n // unit) + ([n % unit] if n % unit else [])
    data = _Data(lengths, sizes, max_len)
    max_tokens = 64
    plan = data.plan(max_tokens=max_tokens, seed=seed, window=window, shuffle=shuffle, span=span)
    _check_epoch(data, plan, max_tokens)
    # no batch reads more than `span` consecutive windows of this epoch's unit order
    window_of_unit = {a: k // plan.window for k, a in enumerate(plan.unit_starts.tolist())}
    for k in range(plan.num_batches):
        b = plan.batch(k)
        windows = {window_of_unit[int(data.starts[u])] for u in np.unique(_unit_of(data, b.ids))}
        j = plan.window_of(k)
        assert windows <= set(range(j - span + 1, j + 1))
        needed = {a for a, _ in plan.window_units(j)}
        assert {int(data.starts[u]) for u in np.unique(_unit_of(data, b.ids))} <= needed


def test_carrying_keeps_batches_full():
    # shards of ~5,000 sequences (a 64 MB shard of instruction vectors holds ~15,000)
    lengths = _lognormal_lengths(40_000, seed=1)
    data = _Data(lengths, [5000] * 8, 8192)
    global_plan = data.plan(max_tokens=8192, window=None, max_shapes=128)
    windowed = data.plan(max_tokens=8192, window=2, max_shapes=128)
    batches = _check_epoch(data, windowed, 8192)
    # the same buckets, so the same padding; carrying remainders keeps nearly every batch full, and even
    # cutting each window on its own (span 1) stays close, its remainders merged into few batches
    cut = data.plan(max_tokens=8192, window=2, max_shapes=128, span=1)
    assert cut.num_batches <= 1.05 * global_plan.num_batches
    _check_epoch(data, cut, 8192)
    assert windowed.pad_fraction == pytest.approx(global_plan.pad_fraction, abs=0.01)
    assert windowed.pad_fraction < 0.05
    assert windowed.num_batches <= 1.03 * global_plan.num_batches
    assert sum(len(b) * b.padded_len for b in batches) / (len(batches) * 8192) > 0.8


def test_plan_is_a_pure_function_of_seed_and_epoch():
    data = _Data(_lognormal_lengths(3_000), [300] * 10, 512)
    rows = lambda p: [(b.ids.tolist(), b.offsets.tolist(), b.padded_len) for b in _all_batches(p)]  # noqa: E731
    a = rows(data.plan(seed=3, epoch=1))
    assert a == rows(data.plan(seed=3, epoch=1))
    assert a != rows(data.plan(seed=3, epoch=2))
    assert a != rows(data.plan(seed=4, epoch=1))


def test_random_access_equals_sequential_building():
    data = _Data(_lognormal_lengths(4_000, seed=5), [250] * 16, 512)
    sequential = [(b.ids.tolist(), b.padded_len) for b in _all_batches(data.plan(window=3))]
    fresh = data.plan(window=3)
    order = np.random.default_rng(0).permutation(fresh.num_batches)
    for k in order[:200].tolist():
        b = fresh.batch(k)
        assert (b.ids.tolist(), b.padded_len) == sequential[k]


def test_unshuffled_plan_keeps_dataset_order():
    data = _Data(_lognormal_lengths(2_000), [200] * 10, 512)
    a = _all_batches(data.plan(epoch=0, shuffle=False, window=3))
    b = _all_batches(data.plan(epoch=7, shuffle=False, window=3))
    assert [x.ids.tolist() for x in a] == [x.ids.tolist() for x in b]
    plan = data.plan(shuffle=False, window=3)
    assert plan.unit_starts.tolist() == sorted(plan.unit_starts.tolist())
    for j in range(plan.num_windows):  # within a window, buckets ascend
        lens = [x.padded_len for x in a[plan._sim.batch_starts[j]:plan._sim.batch_starts[j + 1]]]
        assert lens == sorted(lens)


def test_max_sequences_caps_rows():
    data = _Data(_lognormal_lengths(3_000, seed=3), [300] * 10, 256)
    plan = data.plan(max_tokens=16 * 256, max_sequences=16, window=2)
    batches = _check_epoch(data, plan, 16 * 256)
    assert max(len(b) for b in batches) == 16


def test_items_longer_than_the_largest_bound_are_refused():
    lengths = np.array([5, 30])
    bounds = np.array([8, 16])
    with pytest.raises(ValueError, match="exceeds"):
        unit_bucket_counts(lambda a, b: lengths[a:b], np.array([0]), np.array([2]), bucket_lookup(bounds, 8), 8, 64)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_unit_bucket_counts_equal_windowing_every_unit_then_counting(chunk):
    rng = np.random.default_rng(11)
    lengths = np.clip(np.round(rng.lognormal(3.4, 1.5, size=3000)), 1, 900).astype(np.int64)
    cuts = np.sort(rng.choice(np.arange(1, 3000), 40, replace=False))
    starts, stops = np.concatenate([[0], cuts]), np.concatenate([cuts, [3000]])
    max_len, pm = 128, 8
    bounds = bucket_bounds(window_items(lengths, max_len).lengths, pm, 16)
    lookup = bucket_lookup(bounds, pm)
    counts, tokens = unit_bucket_counts(lambda a, b: lengths[a:b], starts, stops, lookup, pm, max_len,
                                        chunk_positions=chunk)
    for u, (a, b) in enumerate(zip(starts, stops)):
        items = window_items(lengths[a:b], max_len).lengths
        expected = np.bincount(np.searchsorted(bounds, items), minlength=len(bounds))
        np.testing.assert_array_equal(counts[u], expected)
        assert tokens[u] == items.sum()


def test_bounds_come_from_the_node_cache_once_computed(checksum_cache, monkeypatch):
    from streamtrain.data import bounds as bounds_module
    from streamtrain.data import bucketing

    values, counts = np.arange(1, 3000), np.ones(2999)
    first = bounds_module.histogram_bounds(values, counts, 8, 16)
    np.testing.assert_array_equal(first, bucketing.bucket_bounds(values, 8, 16, counts=counts))
    monkeypatch.setattr(bucketing, "bucket_bounds", lambda *a, **k: pytest.fail("computed again"))
    np.testing.assert_array_equal(bounds_module.histogram_bounds(values, counts, 8, 16), first)
    other = np.ones(2999)
    other[5] = 2
    with pytest.raises(pytest.fail.Exception):  # another histogram: not the cached entry
        bounds_module.histogram_bounds(values, other, 8, 16)


def test_remainders_of_many_buckets_merge_into_few_full_batches():
    # small shards, one per window, 128 buckets: each window ends with a remainder in most buckets
    lengths = _lognormal_lengths(6_000, seed=4)
    data = _Data(lengths, [200] * 30, 8192)
    plan = data.plan(max_tokens=8192, window=1, max_shapes=128)
    batches = _check_epoch(data, plan, 8192)  # every item once, within budget, T >= every row
    fill = sum(len(b) * b.padded_len for b in batches) / (len(batches) * 8192)
    unmerged_batches = int(plan._sim.full.sum() + (plan._sim.partial > 0).sum())
    assert len(batches) < 0.5 * unmerged_batches  # one smaller batch per bucket and window before
    assert fill > 0.2  # ~10% when every window emitted one smaller batch per bucket
    assert plan.pad_fraction < 0.15  # what merging costs in padding stays small
    assert sum(plan.shapes().values()) == plan.num_batches
    for b in batches:
        assert b.padded_len >= b.lengths.max() and len(b) * b.padded_len <= 8192
