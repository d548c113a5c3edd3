"""Checksums before use: ShardStream (and every process it feeds) refuses bytes that differ from index.json,
hashing each file version once (streamtrain/data/checksums.py)."""

import os
import types

import numpy as np
import pytest
import torch
from conftest import write_dataset

from streamtrain.data import ShardStream, make_loader
from streamtrain.dataset import (
    checksums,
    file_sha256,
    open_shard,
    read_index,
    verify_dataset,
    write_index,
)
from streamtrain.dataset.checksums import FileVersion
from streamtrain.errors import DataError

DIM = 5
MAX_TOKENS = 1024  # no sequence of the data is windowed


def _sequences(n=117, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.maximum(2, np.round(rng.lognormal(np.log(20), 1.0, n))).astype(int)
    return [rng.standard_normal((int(t), DIM)).astype(np.float32) for t in lengths]


@pytest.fixture
def data(tmp_path):
    seqs = _sequences()
    index = write_dataset(tmp_path / "ds", seqs, shard_bytes=12_000)
    assert len(index.shards) > 3
    return tmp_path / "ds", seqs


@pytest.fixture
def hashes(monkeypatch):
    """Counts the sha256 computations of checksums in this process (the record cache is not hashing)."""
    calls = []
    real = checksums.hashlib.sha256

    def sha256(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(checksums, "hashlib", types.SimpleNamespace(sha256=sha256))
    return calls


def _flip(path, at=None):
    """Flip one byte in the middle of the file (inside the float values, so the shard still parses) in place."""
    raw = bytearray(path.read_bytes())
    at = len(raw) // 2 if at is None else at
    raw[at] ^= 0xFF
    with open(path, "r+b") as f:  # in place: the same inode, as bit rot or a stray write would leave it
        f.write(raw)


def _stream(root, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    return ShardStream(root, **kw)


def _epoch(loader):
    return [b for b in loader]


def _shard_ids(index, s):
    first = index.shards[s].first_id
    return set(range(first, first + index.shards[s].num_sequences))


def test_flipped_bytes_are_refused_with_a_cold_cache(data):
    root, _ = data
    shard = root / read_index(root).shards[2].file
    _flip(shard)
    assert open_shard(shard).num_rows > 0  # still a readable shard: only the checksum can tell
    with pytest.raises(DataError) as err:
        _stream(root)
    message = str(err.value)
    assert str(shard) in message and "checksum mismatch" in message and "\n" not in message


def test_a_verified_version_is_recorded_so_later_processes_hash_nothing(data, hashes, checksum_cache):
    root, seqs = data
    index = read_index(root)
    _stream(root)
    hashed_cold = len(hashes)
    assert hashed_cold == len(index.shards) + 1  # every shard and the lengths file, once
    records = list((checksum_cache / "verified").iterdir())
    assert len(records) == len(index.shards) + 1
    checksums.forget()  # as a fresh process would start
    batches = _epoch(make_loader(_stream(root), num_workers=0))
    assert len(hashes) == hashed_cold  # the records alone: nothing hashed again
    got = {i: b.x[j, : int(b.lengths[j])] for b in batches for j, i in enumerate(b.ids.tolist())}
    assert all(torch.equal(got[i], torch.from_numpy(s)) for i, s in enumerate(seqs) if len(s) <= MAX_TOKENS)


@pytest.mark.parametrize("remembered", ["in this process", "in the record cache only"])
def test_flip_after_a_verified_run_is_hashed_again_and_refused(data, remembered, hashes):
    root, _ = data
    index = read_index(root)
    _epoch(make_loader(_stream(root), num_workers=0))  # verified, and remembered
    assert len(hashes) == len(index.shards) + 1
    shard = root / index.shards[1].file
    _flip(shard)  # the write moves ctime (and mtime): the remembered version no longer matches
    if remembered == "in the record cache only":
        checksums.forget()
    with pytest.raises(DataError, match=f"{shard.name}: checksum mismatch"):
        _stream(root)
    assert len(hashes) == len(index.shards) + 2  # only the changed shard was hashed again


def test_a_worker_refuses_a_shard_changed_after_the_stream_was_built(data):
    root, _ = data
    index = read_index(root)
    ds = _stream(root, seed=3)  # verified here, in the main process
    victim = 2
    shard = root / index.shards[victim].file
    _flip(shard)
    loader = make_loader(ds, num_workers=2, prefetch_factor=1)
    yielded = []
    with pytest.raises(DataError) as err:
        for batch in loader:
            yielded.append(batch)
    message = str(err.value)
    assert str(shard) in message and "checksum mismatch" in message
    assert "\n" not in message and "Traceback" not in message
    assert ds._readers == [None]  # the main process mapped nothing: a worker found it
    bad_ids = _shard_ids(index, victim)
    assert not any(bad_ids & set(b.ids.tolist()) for b in yielded)  # no row of it reached a batch


def test_no_verify_skips_the_checksums(data, hashes):
    root, seqs = data
    index = read_index(root)
    first = index.shards[1].first_id
    shard = root / index.shards[1].file
    _flip(shard)
    after = open_shard(shard)
    stored = [np.asarray(after.column("sequence")[r].as_py(), np.float32).reshape(-1, DIM)
              for r in range(after.num_rows)]
    changed = [r for r in range(after.num_rows) if not np.array_equal(stored[r], seqs[first + r])]
    assert len(changed) == 1
    changed_id = first + changed[0]
    ds = _stream(root, verify=False, shuffle=False)
    batches = _epoch(make_loader(ds, num_workers=0))
    assert hashes == []
    rows = [(b, j) for b in batches for j, i in enumerate(b.ids.tolist()) if i == changed_id]
    assert len(rows) == 1
    b, j = rows[0]
    assert torch.equal(b.x[j, : int(b.lengths[j])], torch.from_numpy(stored[changed[0]]))  # flipped, as it is
    assert not torch.equal(b.x[j, : int(b.lengths[j])], torch.from_numpy(seqs[changed_id]))


@pytest.mark.parametrize("num_workers, verify", [(0, True), (2, True), (0, False)])
def test_a_shard_truncated_after_the_stream_was_built_names_its_size(data, num_workers, verify):
    root, _ = data
    index = read_index(root)
    ds = _stream(root, verify=verify) if not verify else _stream(root)  # the size is checked at every map
    shard = root / index.shards[3].file
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(DataError) as err:
        _epoch(make_loader(ds, num_workers=num_workers))
    assert f"{shard}: {index.shards[3].bytes - 64} bytes, index.json says {index.shards[3].bytes}" in str(err.value)


def test_a_lengths_file_that_differs_from_its_checksum_is_refused(data):
    root, _ = data
    lengths = np.load(root / "lengths.npy")
    lengths[:2] += [1, -1]
    np.save(root / "lengths.npy", lengths)
    with pytest.raises(DataError) as err:
        _stream(root)
    assert f"{root / 'lengths.npy'}: checksum mismatch" in str(err.value) and "lengths_sha256" in str(err.value)
    _stream(root, verify=False)  # planned from them: only the shards can tell at first use (next test)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lengths_that_disagree_with_the_shards_are_refused_before_any_row_is_used(data, num_workers):
    root, _ = data
    index = read_index(root)
    lengths = np.load(root / "lengths.npy")
    lengths[:2] += [1, -1]  # the same tokens, other lengths
    np.save(root / "lengths.npy", lengths)
    index.lengths_sha256 = file_sha256(root / "lengths.npy")  # a consistent index: the checksums pass
    write_index(index)
    ds = _stream(root)
    yielded = []
    with pytest.raises(DataError, match="sequence lengths differ from lengths.npy"):
        for batch in make_loader(ds, num_workers=num_workers):
            yielded.append(batch)
    assert not any(_shard_ids(index, 0) & set(b.ids.tolist()) for b in yielded)


def test_odd_records_and_an_unusable_cache_only_mean_hashing_again(data, hashes, checksum_cache, monkeypatch):
    root, _ = data
    index = read_index(root)
    _stream(root)
    records = sorted((checksum_cache / "verified").iterdir())
    records[0].write_text("garbage\n")
    records[1].write_bytes(b"\xff\xfe")
    records[2].write_text(records[2].read_text()[:-65] + "0" * 64 + "\n")  # another checksum
    checksums.forget()
    hashed = len(hashes)
    _stream(root)
    assert len(hashes) == hashed + 3
    # a cache folder that cannot be created: verified all the same, in this process
    blocker = checksum_cache.parent / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("STREAMTRAIN_CACHE_DIR", str(blocker))
    checksums.forget()
    _epoch(make_loader(_stream(root), num_workers=0))
    shard = root / index.shards[0].file
    _flip(shard)
    with pytest.raises(DataError, match=f"{shard.name}: checksum mismatch"):
        _stream(root)


def test_the_full_audit_ignores_records(data, checksum_cache):
    """verify_dataset (inspect --verify) hashes every byte: a record that claims a damaged file is intact
    (the trust ShardStream gives to an unchanged file version) does not fool it."""
    root, _ = data
    index = read_index(root)
    shard = root / index.shards[1].file
    _flip(shard)
    version = FileVersion.of(os.stat(shard))
    record = checksum_cache / "verified" / f"{version.dev:x}-{version.ino:x}"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(" ".join(["streamtrain-verified-1", *map(str, version), index.shards[1].sha256]) + "\n")
    _stream(root)  # the record is one ShardStream trusts (the file version it names is the current one)
    problems = verify_dataset(index)
    assert problems == [f"{shard}: checksum mismatch (sha256 differs from index.json)"]


def test_a_version_is_remembered_only_once_no_write_can_keep_its_ctime():
    fine = FileVersion(1, 2, 3, 0, 1_700_000_000_123_456_789)
    assert not fine.settled(fine.ctime_ns + 50_000_000)  # within a coarse clock tick or so: not yet
    assert fine.settled(fine.ctime_ns + 150_000_000)
    coarse = FileVersion(1, 2, 3, 0, 1_700_000_000_000_000_000)  # whole seconds: a 1 s (or 2 s) filesystem
    assert not coarse.settled(coarse.ctime_ns + 1_500_000_000)
    assert coarse.settled(coarse.ctime_ns + 2_500_000_000)


def test_eval_style_unshuffled_streams_and_subsets_verify_only_the_shards_they_read(data, hashes):
    root, _ = data
    index = read_index(root)
    last = index.shards[-1]
    _flip(root / index.shards[0].file)
    ids = np.arange(last.first_id, last.first_id + last.num_sequences)
    ds = _stream(root, ids=ids, shuffle=False)  # reads the last shard only: the damaged first one is not needed
    assert {i for b in _epoch(make_loader(ds, num_workers=0)) for i in b.ids.tolist()} == set(ids.tolist())
    with pytest.raises(DataError, match="shard-000000.arrow: checksum mismatch"):
        _stream(root, shuffle=False)


def test_the_full_audit_names_lengths_that_disagree_with_the_shards(data):
    root, _ = data
    index = read_index(root)
    lengths = np.load(root / "lengths.npy")
    first = index.shards[1].first_id
    lengths[first : first + 2] += [1, -1]
    np.save(root / "lengths.npy", lengths)
    index.lengths_sha256 = file_sha256(root / "lengths.npy")
    write_index(index)
    assert verify_dataset(read_index(root)) == [f"{root / index.shards[1].file}: sequence lengths differ from lengths.npy"]
