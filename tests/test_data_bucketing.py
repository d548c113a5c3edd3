import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtrain.data.bucketing import (
    bucket_bounds,
    deal_batches,
    dealt_count,
    item_length_histogram,
    length_histogram,
    pad_fraction,
    plan_epoch,
    round_up,
    split_ids,
    window_items,
)


def lag1_autocorrelation(values):
    """Pearson correlation of consecutive values (0 for a constant or too-short series)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 3 or v.std() == 0:
        return 0.0
    return float(np.corrcoef(v[:-1], v[1:])[0, 1])


def _lognormal_lengths(n, seed=0):
    # median 30, p99 ~1000: sigma = ln(1000 / 30) / z_0.99
    rng = np.random.default_rng(seed)
    sigma = np.log(1000 / 30) / 2.326
    return np.maximum(1, np.round(rng.lognormal(np.log(30), sigma, n))).astype(np.int64)


def _plan(lengths, max_tokens=8192, seed=0, epoch=0, shuffle=True, max_len=None):
    items = window_items(lengths, max_len or max_tokens)
    bounds = bucket_bounds(items.lengths)
    return items, bounds, plan_epoch(items.lengths, bounds, max_tokens, seed, epoch, shuffle)


@given(
    lengths=st.lists(st.integers(0, 60), min_size=1, max_size=30),
    max_len=st.integers(2, 20),
)
@settings(max_examples=200, deadline=None)
def test_windows_cover_each_sequence_and_overlap_by_one(lengths, max_len):
    items = window_items(np.array(lengths), max_len)
    assert (items.lengths <= max_len).all()
    for i, length in enumerate(lengths):
        sel = items.ids == i
        offsets, sizes = items.offsets[sel], items.lengths[sel]
        if length <= max_len:
            assert offsets.tolist() == [0] and sizes.tolist() == [length]
            continue
        assert offsets[0] == 0 and offsets[-1] + sizes[-1] == length
        # window k + 1 starts on the last vector of window k: every next-vector target lies in one window
        assert (offsets[1:] == offsets[:-1] + sizes[:-1] - 1).all()
        assert (sizes[:-1] == max_len).all() and sizes[-1] >= 2


def test_window_items_keeps_given_ids():
    items = window_items(np.array([3, 12]), 5, ids=np.array([40, 7]))
    assert items.ids.tolist() == [40, 7, 7, 7]
    assert items.offsets.tolist() == [0, 0, 4, 8]
    assert items.lengths.tolist() == [3, 5, 5, 4]


def test_window_items_rejects_max_len_below_two():
    with pytest.raises(ValueError, match="max_len"):
        window_items(np.array([5]), 1)


def test_bucket_bounds_are_few_aligned_and_cover_every_item():
    lengths = _lognormal_lengths(20_001)
    bounds = bucket_bounds(np.minimum(lengths, 8192), pad_multiple=8, max_shapes=64)
    assert len(bounds) <= 64
    assert (bounds % 8 == 0).all() and (np.diff(bounds) > 0).all()
    assert bounds[-1] >= min(lengths.max(), 8192)


def test_bucket_bounds_use_every_rounded_length_when_few():
    bounds = bucket_bounds(np.array([1, 3, 9, 17, 17, 40]), pad_multiple=8, max_shapes=16)
    assert bounds.tolist() == [8, 16, 24, 40]
    assert round_up(np.array([0, 1, 8, 9]), 8).tolist() == [8, 8, 8, 16]


def test_more_shapes_never_waste_more():
    lengths = np.minimum(_lognormal_lengths(5_003, seed=1), 4096)
    rounded_waste = []
    for shapes in (8, 16, 32, 64):
        bounds = bucket_bounds(lengths, max_shapes=shapes)
        padded = bounds[np.searchsorted(bounds, lengths)]
        rounded_waste.append(int((padded - lengths).sum()))
    assert rounded_waste == sorted(rounded_waste, reverse=True)


def test_plan_yields_every_item_once_within_budget():
    lengths = _lognormal_lengths(20_001)
    items, bounds, plan = _plan(lengths, max_tokens=8192)
    assert np.array_equal(np.sort(plan.order), np.arange(len(items)))
    for b in range(plan.num_batches):
        members, padded_len = plan.batch(b)
        assert len(members) * padded_len <= 8192
        assert items.lengths[members].max() <= padded_len
        assert padded_len in bounds
    assert len(np.unique(plan.padded_len)) <= 128


def test_pad_fraction_is_under_five_percent_on_a_heavy_tail():
    lengths = _lognormal_lengths(20_001)
    items, _, plan = _plan(lengths, max_tokens=8192)
    assert pad_fraction(items.lengths, plan) < 0.05


def test_batch_lengths_do_not_follow_a_sawtooth():
    lengths = _lognormal_lengths(20_001)
    _, _, plan = _plan(lengths, max_tokens=8192)
    epoch_padded_len = plan.padded_len[plan.batch_order]
    assert abs(lag1_autocorrelation(epoch_padded_len)) < 0.3
    for rank in range(3):
        mine = deal_batches(plan.num_batches, rank, 3)
        assert abs(lag1_autocorrelation(epoch_padded_len[mine])) < 0.3


def test_plan_is_a_pure_function_of_seed_and_epoch():
    lengths = _lognormal_lengths(2_001)
    _, _, a = _plan(lengths, seed=3, epoch=1)
    _, _, b = _plan(lengths, seed=3, epoch=1)
    _, _, c = _plan(lengths, seed=3, epoch=2)
    _, _, d = _plan(lengths, seed=4, epoch=1)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.batch_order, b.batch_order)
    assert not np.array_equal(a.order, c.order)
    assert not np.array_equal(a.order, d.order)
    # batch counts depend on the length histogram only
    assert a.num_batches == c.num_batches == d.num_batches


def test_unshuffled_plan_is_fixed_and_ascending():
    lengths = _lognormal_lengths(2_001)
    _, _, a = _plan(lengths, epoch=0, shuffle=False)
    _, _, b = _plan(lengths, epoch=5, shuffle=False)
    assert np.array_equal(a.order, b.order)
    assert np.array_equal(a.batch_order, np.arange(a.num_batches))
    assert (np.diff(a.padded_len) >= 0).all()


def test_plan_rejects_items_longer_than_the_largest_bound():
    with pytest.raises(ValueError, match="exceeds"):
        plan_epoch(np.array([5, 30]), np.array([8, 16]), 64, 0, 0)


@pytest.mark.parametrize("num_batches", [0, 1, 2, 7, 9])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_dealing_gives_every_rank_the_same_count(num_batches, world_size):
    for drop_last in (False, True):
        per_rank = [deal_batches(num_batches, r, world_size, drop_last) for r in range(world_size)]
        assert {len(p) for p in per_rank} == {dealt_count(num_batches, world_size, drop_last)}
        taken = np.concatenate(per_rank)
        counts = np.bincount(taken, minlength=num_batches) if num_batches else np.zeros(0, int)
        if drop_last:
            assert counts.max(initial=0) <= 1 and num_batches - counts.sum() < world_size
        else:
            assert counts.min(initial=1) >= 1 and (counts - 1).sum() < world_size


def test_split_ids_is_disjoint_complete_and_deterministic():
    train, val = split_ids(117, 0.1, seed=2)
    assert len(val) == 12 and len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(117))
    train2, val2 = split_ids(117, 0.1, seed=2)
    assert np.array_equal(val, val2) and np.array_equal(train, train2)


def test_max_sequences_caps_rows_and_keeps_every_item_once():
    lengths = _lognormal_lengths(2_001, seed=3)
    items = window_items(lengths, 1024)
    bounds = bucket_bounds(items.lengths)
    plan = plan_epoch(items.lengths, bounds, 16 * 1024, 0, 0, max_sequences=16)
    assert np.array_equal(np.sort(plan.order), np.arange(len(items)))
    sizes = np.array([len(plan.batch(b)[0]) for b in range(plan.num_batches)])
    assert sizes.max() == 16
    # only the last batch of each bucket may be short
    assert (sizes < 16).sum() <= len(np.unique(plan.padded_len))


@given(lengths=st.lists(st.integers(0, 90), min_size=1, max_size=60), max_len=st.integers(2, 30))
@settings(max_examples=150, deadline=None)
def test_item_histogram_equals_the_histogram_of_the_windowed_items(lengths, max_len):
    lengths = np.array(lengths)
    values, counts = length_histogram(lengths, chunk=7)
    assert np.array_equal(np.repeat(values, counts), np.sort(lengths))
    item_values, item_counts = item_length_histogram(values, counts, max_len)
    want_values, want_counts = np.unique(window_items(lengths, max_len).lengths, return_counts=True)
    assert item_values.tolist() == want_values.tolist() and item_counts.tolist() == want_counts.tolist()


def test_bounds_from_a_histogram_equal_bounds_from_the_items():
    lengths = np.minimum(_lognormal_lengths(30_011, seed=4), 4000)
    values, counts = length_histogram(lengths)
    for shapes in (4, 16, 128):
        assert np.array_equal(bucket_bounds(values, max_shapes=shapes, counts=counts), bucket_bounds(lengths, max_shapes=shapes))
