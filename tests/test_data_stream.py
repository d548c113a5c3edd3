import os
import pickle
import signal
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import write_dataset

from streamtrain.data import Batch, Loader, ShardStream, make_loader
from streamtrain.data.bucketing import window_items
from streamtrain.data.transport import BatchRing, SlotBatch, SlotGroup
from streamtrain.dataset import read_index
from streamtrain.errors import DataError, UserError

DIM = 5
NUM_SEQUENCES = 117
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """117 sequences with a heavy tail (some longer than MAX_TOKENS, so windowed), over several shards."""
    rng = np.random.default_rng(0)
    lengths = np.maximum(1, np.round(rng.lognormal(np.log(20), 1.3, NUM_SEQUENCES))).astype(int)
    lengths[:3] = [700, 300, 257]
    seqs = [rng.standard_normal((int(t), DIM)).astype(np.float32) for t in lengths]
    root = tmp_path_factory.mktemp("stream") / "ds"
    index = write_dataset(root, seqs, shard_bytes=12_000)
    assert len(index.shards) > 3
    return root, seqs


def _stream(root, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    return ShardStream(root, **kw)


def _run(loader, limit=None):
    out = []
    if limit == 0:
        return out
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def _items(batches):
    return [(i, o) for b in batches for i, o in zip(b.ids.tolist(), b.offsets.tolist())]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("x", "mask", "lengths", "ids", "offsets"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_one_epoch_yields_every_item_once_bit_exact_and_zero_padded(data):
    root, seqs = data
    ds = _stream(root, seed=1)
    batches = _run(make_loader(ds, num_workers=0))
    assert len(batches) == ds.num_batches() == len(ds)
    items = _items(batches)
    assert len(items) == len(set(items)) == len(ds.items)
    assert {i for i, _ in items} == set(range(NUM_SEQUENCES))
    for b in batches:
        B, T, D = b.x.shape
        assert b.x.dtype == torch.float32 and D == DIM and T % 8 == 0
        assert b.num_padded_tokens == B * T <= MAX_TOKENS
        assert b.num_real_tokens == int(b.mask.sum())
        assert torch.equal(b.mask, torch.arange(T)[None, :] < b.lengths[:, None])
        assert not b.x[~b.mask].any()  # padding is exactly zero
        for j in range(B):
            i, o, n = int(b.ids[j]), int(b.offsets[j]), int(b.lengths[j])
            assert torch.equal(b.x[j, :n], torch.from_numpy(seqs[i][o : o + n]))


def test_windows_of_long_sequences_reassemble_the_original(data):
    root, seqs = data
    ds = _stream(root, max_len=64)
    windows = {}
    for b in _run(make_loader(ds, num_workers=0)):
        for j in range(len(b)):
            n = int(b.lengths[j])
            windows.setdefault(int(b.ids[j]), []).append((int(b.offsets[j]), b.x[j, :n].numpy()))
    assert sum(len(seqs[i]) > 64 for i in windows) >= 3
    for i, parts in windows.items():
        parts.sort(key=lambda p: p[0])
        # consecutive windows share one vector
        rebuilt = np.concatenate([parts[0][1]] + [p[1][1:] for p in parts[1:]])
        assert np.array_equal(rebuilt, seqs[i])
        assert all(len(p[1]) <= 64 for p in parts)


def test_same_seed_and_epoch_give_the_same_stream_another_epoch_another(data):
    root, _ = data
    a = _run(make_loader(_stream(root, seed=5), num_workers=0))
    b = _run(make_loader(_stream(root, seed=5), num_workers=0))
    _assert_same(a, b)
    ds = _stream(root, seed=5)
    ds.set_epoch(1)
    c = _run(make_loader(ds, num_workers=0))
    assert [x.ids.tolist() for x in a] != [x.ids.tolist() for x in c]
    assert sorted(_items(a)) == sorted(_items(c))


def test_unshuffled_stream_is_the_same_every_epoch(data):
    root, _ = data
    ds = _stream(root, shuffle=False, window=2)
    loader = make_loader(ds, num_workers=0)
    first, second = _run(loader), _run(loader)
    assert loader.epoch == 2
    _assert_same(first, second)
    starts = ds.plan(0).window_starts().tolist()
    assert len(starts) > 2  # several windows
    for a, b in zip(starts[:-1], starts[1:]):  # buckets ascend within each window
        widths = [x.x.shape[1] for x in first[a:b]]
        assert widths == sorted(widths)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_equal_batch_counts_and_cover_the_epoch(data, world_size, drop_last):
    root, _ = data
    per_rank = [
        _run(make_loader(_stream(root, seed=2, rank=r, world_size=world_size, drop_last=drop_last), num_workers=0))
        for r in range(world_size)
    ]
    counts = {len(p) for p in per_rank}
    assert len(counts) == 1
    num_items = len(_stream(root).items)
    seen = Counter(item for p in per_rank for item in _items(p))
    global_batches = _stream(root).num_global_batches()
    if drop_last:
        assert max(seen.values()) == 1
        assert counts.pop() == global_batches // world_size
    else:
        assert len(seen) == num_items
        assert counts.pop() == -(-global_batches // world_size)
        # fewer than world_size batches repeat
        assert sum(seen.values()) - num_items <= (world_size - 1) * MAX_TOKENS // 8


def test_rank_stream_does_not_depend_on_num_workers(data):
    root, _ = data
    solo = _run(make_loader(_stream(root, seed=3, rank=1, world_size=2), num_workers=0))
    pooled = _run(make_loader(_stream(root, seed=3, rank=1, world_size=2), num_workers=2))
    _assert_same(solo, pooled)


def test_resume_mid_epoch_and_across_epochs_is_exact(data):
    root, _ = data
    reference = make_loader(_stream(root, seed=4), num_workers=0)
    epoch0, epoch1 = _run(reference), _run(reference)
    n = len(epoch0)
    for stop in (0, 7, n - 1, n, n + 5):
        loader = make_loader(_stream(root, seed=4), num_workers=0)
        _run(loader, limit=n)  # epoch 0 in full when stop >= n
        if stop < n:
            loader = make_loader(_stream(root, seed=4), num_workers=0)
            _run(loader, limit=stop)
        elif stop > n:
            _run(loader, limit=stop - n)
        state = loader.state_dict()
        assert set(state) >= {"epoch", "batches_done", "seed", "world_size", "num_batches"}
        resumed = make_loader(_stream(root, seed=4), num_workers=0)
        resumed.load_state_dict(state)
        expected = (epoch0 + epoch1)[stop:]
        got = _run(resumed) + (_run(resumed) if stop < n else [])
        _assert_same(got, expected)


def test_resume_with_another_num_workers_is_exact(data):
    root, _ = data
    reference = _run(make_loader(_stream(root, seed=6), num_workers=0))
    loader = make_loader(_stream(root, seed=6), num_workers=0)
    _run(loader, limit=5)
    resumed = make_loader(_stream(root, seed=6), num_workers=2, persistent_workers=True)
    resumed.load_state_dict(loader.state_dict())
    _assert_same(_run(resumed), reference[5:])
    # the persistent workers pick up the next epoch and a set_epoch made in the main process
    nxt = _run(resumed)
    resumed.set_epoch(1)
    again = _run(resumed)
    _assert_same(nxt, again)
    ds = _stream(root, seed=6)
    ds.set_epoch(1)
    _assert_same(nxt, _run(make_loader(ds, num_workers=0)))


@pytest.mark.parametrize("old_world, new_world, per_rank_done", [(2, 3, 4), (3, 2, 5), (2, 3, 5)])
def test_resume_with_another_world_size_continues_the_global_position(data, old_world, new_world, per_rank_done):
    root, _ = data
    loaders = [make_loader(_stream(root, seed=7, rank=r, world_size=old_world), num_workers=0)
               for r in range(old_world)]
    taken = [b for loader in loaders for b in _run(loader, limit=per_rank_done)]
    state = loaders[0].state_dict()
    consumed = per_rank_done * old_world
    assert state["global_batches_done"] == consumed
    rest = []
    for r in range(new_world):
        ds = _stream(root, seed=7, rank=r, world_size=new_world)
        resumed = make_loader(ds, num_workers=0)
        resumed.load_state_dict(state)
        assert (resumed.epoch, resumed.batches_done) == (0, consumed // new_world)
        rest += _run(resumed)
        assert (resumed.epoch, resumed.batches_done) == (1, 0)
    # every batch of the epoch's global list (items as sets: a batch is one plan segment)
    plan = ds.plan(0)
    epoch_batches = Counter(
        tuple(sorted((int(i), int(o)) for i, o in zip(plan.batch(b).ids, plan.batch(b).offsets)))
        for b in range(plan.num_batches)
    )
    assert max(epoch_batches.values()) == 1
    seen = Counter(tuple(sorted(zip(b.ids.tolist(), b.offsets.tolist()))) for b in taken + rest)
    assert set(seen) == set(epoch_batches)  # none skipped, nothing from elsewhere
    # the new world's padding to a multiple of W' repeats batches from the start of the list, as any epoch
    # does; the resume itself repeats at most W' - 1
    padding = -(-plan.num_batches // new_world) * new_world - plan.num_batches
    repeated = sum(seen.values()) - len(seen)
    assert repeated == padding + consumed % new_world <= padding + new_world - 1


def test_iterating_the_stream_directly_yields_the_rest_of_the_current_epoch(data):
    root, _ = data
    reference = _run(make_loader(_stream(root, seed=12), num_workers=0))
    ds = _stream(root, seed=12)
    loader = make_loader(ds, num_workers=0)
    _run(loader, limit=5)
    _assert_same(list(ds), reference[5:])
    assert (ds.epoch, ds.batches_done) == (0, 5)  # direct iteration does not move the position
    _assert_same(_run(loader), reference[5:])


def test_set_epoch_keeps_a_resumed_position_and_restarts_otherwise(data):
    root, _ = data
    ds = _stream(root)
    loader = make_loader(ds, num_workers=0)
    _run(loader, limit=3)
    ds.set_epoch(0)
    assert (ds.epoch, ds.batches_done) == (0, 3)
    ds.set_epoch(2)
    assert (ds.epoch, ds.batches_done) == (2, 0)
    _run(loader)
    assert (loader.epoch, loader.batches_done) == (3, 0)


def test_load_state_dict_rejects_a_state_from_another_plan(data):
    root, _ = data
    state = make_loader(_stream(root, seed=1), num_workers=0).state_dict()
    with pytest.raises(UserError, match="seed"):
        make_loader(_stream(root, seed=2), num_workers=0).load_state_dict(state)
    with pytest.raises(UserError, match="batches in epoch"):
        make_loader(_stream(root, seed=1, max_tokens=512, max_len=MAX_TOKENS), num_workers=0).load_state_dict(state)


def test_ids_subset_yields_only_those_ids(data):
    root, _ = data
    subset = np.arange(0, NUM_SEQUENCES, 3)
    batches = _run(make_loader(_stream(root, ids=subset, shuffle=False), num_workers=0))
    assert sorted({i for i, _ in _items(batches)}) == subset.tolist()


def test_stream_pickles_small_before_reading(data):
    root, _ = data
    ds = _stream(root)
    blob = pickle.dumps(ds)
    assert ds._readers == [None] and len(blob) < 64_000
    next(iter(ds))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._readers == [None]
    _assert_same([next(iter(clone))], [next(iter(ds))])


@pytest.mark.parametrize("kw", [{}, {"max_tokens": 1024}, {"ids": np.arange(1, NUM_SEQUENCES)},
                                {"ids": np.arange(NUM_SEQUENCES)}])
def test_items_are_the_windows_as_int64_and_the_stream_pickles_without_them(data, kw):
    root, _ = data
    ds = _stream(root, **kw)
    lengths = read_index(root).lengths()
    ids = kw.get("ids", np.arange(NUM_SEQUENCES))
    expected = window_items(lengths[ids], ds.max_len, ids)
    for name in ("ids", "offsets", "lengths"):
        got = getattr(ds.items, name)
        assert got.dtype == np.int64 and np.array_equal(got, getattr(expected, name)), name
    assert ds.num_items == len(ds.items) == len(expected)
    # what a worker receives holds no per-item array: planning rebuilds a window's items from the lengths
    state = ds.__getstate__()
    per_item = [k for k, v in state.items() if isinstance(v, np.ndarray) and len(v) >= len(expected) > 100]
    assert per_item == []
    clone = pickle.loads(pickle.dumps(ds))
    _assert_same(list(clone), _run(make_loader(ds, num_workers=0)))


def test_batch_moves_and_pin_memory_flag_is_ignored_without_cuda(data):
    root, _ = data
    loader = make_loader(_stream(root), num_workers=0, pin_memory=True)
    batch = next(iter(loader))
    assert isinstance(loader, Loader) and isinstance(batch, Batch)
    moved = batch.to("cpu")
    assert torch.equal(moved.x, batch.x) and moved.ids.dtype == torch.int64
    if not torch.cuda.is_available():
        assert loader.pin_memory is False


def test_in_process_loader_pins_every_tensor_of_every_batch_when_asked(data, monkeypatch):
    root, _ = data
    expected = _run(make_loader(_stream(root, seed=4), num_workers=0, pin_memory=False))
    pinned = []
    # pinning needs CUDA: an identity that records its calls stands in, so the in-process pin path runs
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t.data_ptr()) or t)
    loader = Loader(_stream(root, seed=4), num_workers=0, pin_memory=True)
    assert loader.pin_memory
    got = _run(loader)
    _assert_same(got, expected)
    assert len(pinned) == 5 * len(got)  # x, mask, lengths, ids, offsets of each batch
    assert {b.x.data_ptr() for b in got} <= set(pinned)
    assert (loader.epoch, loader.batches_done) == (1, 0)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_missing_shard_raises_a_readable_data_error(data, tmp_path, num_workers):
    root, seqs = data
    copy = tmp_path / "ds"
    write_dataset(copy, seqs, shard_bytes=12_000)
    ds = _stream(copy, shuffle=False)
    victim = copy / read_index(copy).shards[-1].file
    victim.unlink()
    with pytest.raises(DataError) as err:
        _run(make_loader(ds, num_workers=num_workers))
    message = str(err.value)
    assert victim.name in message and "missing" in message
    assert "\n" not in message and "Traceback" not in message


def test_stream_checks_shard_files_and_arguments_up_front(data, tmp_path):
    root, seqs = data
    copy = tmp_path / "ds"
    write_dataset(copy, seqs, shard_bytes=12_000)
    shard = copy / read_index(copy).shards[0].file
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=shard.name):
        _stream(copy)
    with pytest.raises(UserError, match="max_len"):
        _stream(root, max_len=MAX_TOKENS + 8)
    with pytest.raises(UserError, match="rank"):
        _stream(root, rank=2, world_size=2)
    with pytest.raises(UserError, match="seed"):
        _stream(root, seed=-1)


# -- hand-over from workers through the shared-memory ring ---------------------------------------------


def test_ring_claims_free_slots_ignores_stale_releases_and_stops_waiting_on_a_new_generation():
    ring = BatchRing(num_workers=2, slots_per_worker=2, slot_floats=12)
    generation = ring.start(1)
    a, b = ring.claim(1, generation), ring.claim(1, generation)
    assert {a[0], b[0]} == {0, 1} and a[1] != b[1]
    ring.slot(1, a[0], (3, 4))[:] = 7.0
    assert not ring.slot(0, a[0], (12,)).any()  # regions of other workers are apart
    ring.release(1, a[0], a[1] + 100)  # not the batch in the slot: ignored
    assert ring.holds(1, a[0], a[1])
    ring.release(1, a[0], a[1])
    c = ring.claim(1, generation)
    assert c[0] == a[0] and c[1] > b[1]
    ring.new_generation()  # both slots held and the iteration over: the worker stops waiting
    assert ring.claim(1, generation) is None
    generation = ring.start(1)  # a restarted worker frees its region
    d = ring.claim(1, generation)
    assert d == (0, c[1] + 1)
    for stale in (a, b, c):  # late releases of the previous iteration's batches: ignored
        ring.release(1, 0, stale[1])
    assert ring.holds(1, 0, d[1])


def test_worker_batches_reuse_ring_slots_across_epochs_and_equal_in_process_ones(data):
    root, _ = data
    reference = make_loader(_stream(root, seed=8), num_workers=0)
    expected = [_run(reference), _run(reference)]
    loader = make_loader(_stream(root, seed=8), num_workers=2, prefetch_factor=1)
    got = [_run(loader), _run(loader)]
    ring = loader.dataset.ring
    assert isinstance(ring, BatchRing) and 2 * ring.num_workers * ring.slots_per_worker < len(expected[0])
    for e in range(2):
        _assert_same(got[e], expected[e])
        assert all(b.x.dtype == torch.float32 and b.mask.dtype == torch.bool and b.ids.dtype == torch.int64
                   for b in got[e])
    assert all(not b.x.is_shared() for b in got[0])  # copied out: users may keep batches
    # slots are reused (the ring is smaller than an epoch) and only the padding is zeroed: it is exactly zero
    assert all(not b.x[~b.mask].any() for e in range(2) for b in got[e])
    assert (loader.epoch, loader.batches_done) == (2, 0)


def test_a_killed_worker_fails_one_iteration_and_the_next_resumes_from_the_position(data):
    root, _ = data
    loader = make_loader(_stream(root, seed=11), num_workers=2, prefetch_factor=1, persistent_workers=True)
    assert len(loader) > 20
    _run(loader)  # a whole epoch first: the workers are persistent ones being reused
    it = iter(loader)
    taken = [next(it) for _ in range(3)]
    victim = loader._dataloader._iterator._workers[0].pid
    # DataLoader reports the death from next() or from its SIGCHLD handler, wherever the main thread is
    with pytest.raises(RuntimeError, match="worker"):
        os.kill(victim, signal.SIGKILL)
        for batch in it:
            taken.append(batch)
    it.close()
    assert (loader.epoch, loader.batches_done) == (1, len(taken))
    state = loader.state_dict()
    rest = _run(loader)
    fresh = make_loader(_stream(root, seed=11), num_workers=0)
    fresh.load_state_dict(state)
    _assert_same(rest, _run(fresh))
    ds = _stream(root, seed=11)
    ds.set_epoch(1)
    _assert_same(taken + rest, _run(make_loader(ds, num_workers=0)))  # nothing lost, nothing repeated
    assert (loader.epoch, loader.batches_done) == (2, 0)
    # and the epoch after runs on the fresh workers too
    ds.set_epoch(2)
    _assert_same(_run(loader), _run(make_loader(ds, num_workers=0)))


def test_taking_a_batch_from_a_reused_slot_raises():
    ring = BatchRing(num_workers=1, slots_per_worker=1, slot_floats=2 * 4 * 3)
    generation = ring.start(0)
    slot, seq = ring.claim(0, generation)
    rows = np.array([4, 2])
    stale = SlotBatch(ring.token, 0, slot, seq, 4, 3, rows, np.array([0, 1]), np.array([0, 0]))
    ring.release(0, slot, seq)
    assert ring.claim(0, generation) == (slot, seq + 1)
    with pytest.raises(RuntimeError, match="reused"):
        stale.take()


def test_slot_groups_take_and_pin_every_batch(monkeypatch):
    ring = BatchRing(num_workers=1, slots_per_worker=2, slot_floats=2 * 4 * 3)
    generation = ring.start(0)
    batches = []
    for n in (3, 1):
        slot, seq = ring.claim(0, generation)
        ring.slot(0, slot, (2, 4, 3))[:] = 0
        ring.slot(0, slot, (2, 4, 3))[0, :n] = n
        batches.append(SlotBatch(ring.token, 0, slot, seq, 4, 3, np.array([n, 0]), np.array([7, 8]), np.array([0, 0])))
    group = pickle.loads(pickle.dumps(SlotGroup(batches)))  # as DataLoader hands it over
    # pinning needs CUDA: stand in an identity so that the pin path itself runs
    pinned = []
    real_empty = torch.empty
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    got = group.pin_memory()
    assert [b.lengths.tolist() for b in got] == [[3, 0], [1, 0]]
    for b, n in zip(got, (3, 1)):
        assert (b.x[0, :n] == n).all() and not b.x[0, n:].any() and not b.x[1].any()
        assert torch.equal(b.mask, torch.arange(4)[None, :] < b.lengths[:, None])
        assert b.ids.tolist() == [7, 8]
    assert len(pinned) == 2 * 4  # mask, lengths, ids, offsets of each batch
    assert not ring._views()[1].any()  # both slots freed


@pytest.mark.parametrize("persistent", [True, False])
def test_abandoning_a_worker_iteration_then_iterating_again_continues_the_stream(data, persistent):
    root, _ = data
    expected = _run(make_loader(_stream(root, seed=9), num_workers=0))
    loader = make_loader(_stream(root, seed=9), num_workers=2, prefetch_factor=1, persistent_workers=persistent)
    held = iter(loader)  # kept open: its workers have filled their slots and wait
    first = [next(held) for _ in range(3)]
    rest = _run(loader)
    _assert_same(first + rest, expected)
    assert (loader.epoch, loader.batches_done) == (1, 0)
    del held


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_worker_batches_are_pinned_on_cuda_and_equal_in_process_ones(data):
    root, _ = data
    expected = _run(make_loader(_stream(root, seed=10), num_workers=0, pin_memory=False))
    got = _run(make_loader(_stream(root, seed=10), num_workers=2, pin_memory=True))
    _assert_same(got, expected)
    assert all(b.x.is_pinned() and b.lengths.is_pinned() for b in got)


def test_max_sequences_gives_fixed_size_batches(data):
    root, seqs = data
    ds = _stream(root, max_tokens=16 * 64, max_len=64, max_sequences=16, shuffle=False)
    batches = _run(make_loader(ds, num_workers=0))
    assert max(len(b) for b in batches) == 16
    assert all(b.num_padded_tokens <= 16 * 64 for b in batches)
    assert sorted(_items(batches)) == sorted(_items(_run(make_loader(_stream(root, max_tokens=16 * 64, max_len=64), num_workers=0))))
    with pytest.raises(UserError, match="max_sequences"):
        _stream(root, max_sequences=0)


_LOW_FD_LIMIT_SCRIPT = """
import hashlib, json, os, resource, sys
import numpy as np
from streamtrain.data import ShardStream, make_loader

root, max_open = sys.argv[1], json.loads(sys.argv[2])
headroom = 32
limit = len(os.listdir("/proc/self/fd")) + headroom
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
shards_dir = os.path.realpath(os.path.join(root, "shards"))

def mapped_shards(pid):
    with open(f"/proc/{pid}/maps") as f:
        return len({line.split(maxsplit=5)[-1] for line in f if shards_dir in line})

report = {"limit": limit}
for workers in (0, 2):
    loader = make_loader(ShardStream(root, max_tokens=64, seed=1, max_open_shards=max_open), num_workers=workers)
    digests = {}
    for batch in loader:
        for j, i in enumerate(batch.ids.tolist()):
            row = batch.x[j, : int(batch.lengths[j])].numpy()
            digests.setdefault(i, []).append(hashlib.sha1(row.tobytes()).hexdigest())
    pids = [w.pid for w in loader._dataloader._iterator._workers] if workers else [os.getpid()]
    report[workers] = {"digests": digests, "mapped": [mapped_shards(pid) for pid in pids]}
print(json.dumps(report))
"""


@pytest.mark.parametrize("max_open_shards", [None, 8])
def test_an_epoch_over_more_shards_than_the_open_file_limit(tmp_path, max_open_shards):
    import hashlib
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    seqs = [rng.standard_normal((int(rng.integers(2, 40)), DIM)).astype(np.float32) for _ in range(500)]
    root = tmp_path / "ds"
    index = write_dataset(root, seqs, shard_bytes=400)
    out = subprocess.run([sys.executable, "-c", _LOW_FD_LIMIT_SCRIPT, str(root), json.dumps(max_open_shards)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["limit"] < len(index.shards)
    expected = {i: [hashlib.sha1(s.tobytes()).hexdigest()] for i, s in enumerate(seqs)}
    for workers in ("0", "2"):
        assert {int(i): d for i, d in report[workers]["digests"].items()} == expected  # each id once, bit exact
        bound = len(index.shards) if max_open_shards is None else max_open_shards
        assert all(0 < n <= bound for n in report[workers]["mapped"]), report[workers]["mapped"]


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_memory_is_reused_once_a_batch_is_dropped_and_never_while_it_is_kept(data, workers):
    # in-process: the memory the batch is built in; with workers: where the main process copies it out of the ring
    root, seqs = data
    ds = _stream(root, seed=3)
    expected = [b.x.clone() for b in _run(make_loader(_stream(root, seed=3), num_workers=0))]
    kept, addresses = {}, set()
    for k, b in enumerate(make_loader(ds, num_workers=workers)):
        # a buffer that held a longer batch before: padding zeroed again, rows exactly the data
        assert torch.equal(b.x, expected[k]), k
        assert not b.x[~b.mask].any()
        addresses.add(b.x.data_ptr())
        if k % 3 == 0:
            kept[k] = b  # kept batches must never be overwritten by later ones
        del b
    assert len(addresses) < len(expected) // 2  # memory came back and was reused
    for k, b in kept.items():
        assert torch.equal(b.x, expected[k]), k


def test_batch_buffers_hold_a_bounded_number_free_and_give_back_only_dead_arrays():
    from streamtrain.data.buffers import BatchBuffers

    pool = BatchBuffers(capacity=64, keep=2)
    a, dirty = pool.take((2, 4, 8))
    assert dirty and a.shape == (2, 4, 8) and a.dtype == np.float32
    b, _ = pool.take((1, 8, 8))
    c, _ = pool.take((8, 8))
    assert pool.num_free == 0
    base_a = a.base
    del a
    assert pool.num_free == 1
    d, _ = pool.take((4, 4))
    assert d.base is base_a  # the freed buffer, not a new one
    del b, c, d
    assert pool.num_free == 2  # `keep` bounds what is held free
    big, dirty = pool.take((3, 30))  # over the capacity: a fresh zeroed array, not from the pool
    assert not dirty and not big.any() and pool.num_free == 2
