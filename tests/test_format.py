import json
import os
import subprocess
import sys

import numpy as np
import pytest

from streamtrain import format as F
from streamtrain.errors import DataError

from conftest import write_dataset


def _heavy_tailed(rng, n, dim=5):
    lengths = np.clip(rng.lognormal(np.log(20), 1.2, n).astype(int), 2, 400)
    return [(rng.standard_normal((int(t), dim)) * (1 + np.arange(dim))).astype(np.float32) for t in lengths]


def test_round_trip_and_index(tmp_path):
    rng = np.random.default_rng(1)
    seqs = _heavy_tailed(rng, 117)
    index = write_dataset(tmp_path, seqs, shard_bytes=4096)
    assert index.num_sequences == 117
    assert index.num_tokens == sum(len(s) for s in seqs)
    assert len(index.shards) > 3
    assert index.shard_offsets[-1] == 117
    np.testing.assert_array_equal(index.lengths(), [len(s) for s in seqs])
    back = []
    for info in index.shards:
        table = F.open_shard(tmp_path / info.file)
        assert table.schema.equals(F.shard_schema(5), check_metadata=False)
        assert table.num_rows == info.num_sequences
        for row in table.column("sequence").to_pylist():
            back.append(np.asarray(row, dtype=np.float32))
    assert len(back) == 117
    for a, b in zip(seqs, back):
        assert a.tobytes() == b.tobytes()
    assert F.verify_dataset(index) == []


def test_stats_match_float64_reference(tmp_path):
    rng = np.random.default_rng(2)
    seqs = _heavy_tailed(rng, 61)
    seqs[0][:, 2] = 1e4  # a large offset: a naive sum-of-squares would lose the variance
    index = write_dataset(tmp_path, seqs, shard_bytes=2048)
    allv = np.concatenate(seqs).astype(np.float64)
    np.testing.assert_allclose(index.mean, allv.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(index.std, allv.std(0), rtol=1e-10)


def test_running_stats_merge_is_order_free():
    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal((int(n), 3)) + 5 for n in rng.integers(1, 50, 9)]
    a = F.RunningStats(3)
    for c in chunks:
        a.add_values(c)
    b = F.RunningStats(3)
    for c in reversed(chunks):
        part = F.RunningStats(3)
        part.add_values(c)
        b.merge(F.RunningStats.from_json(json.loads(json.dumps(part.to_json()))))
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-13)
    np.testing.assert_allclose(a.std, b.std, rtol=1e-12)


def test_not_a_dataset_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="streamtrain convert"):
        F.read_index(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        F.read_index(tmp_path / "missing")
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        F.read_index(tmp_path)


def test_newer_format_version_refused(tmp_path):
    index = write_dataset(tmp_path, [np.zeros((3, 2), np.float32)])
    raw = json.loads((tmp_path / "index.json").read_text())
    raw["format_version"] = F.FORMAT_VERSION + 1
    (tmp_path / "index.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="newer"):
        F.read_index(tmp_path)
    assert index.num_sequences == 1


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw.update(format_version="1"), "'format_version' must be an integer"),
    (lambda raw: raw.update(format_version=True), "'format_version' must be an integer"),
    (lambda raw: raw.update(dim=0), "'dim' must be >= 1"),
    (lambda raw: raw.update(num_sequences=2.5), "'num_sequences' must be an integer"),
    (lambda raw: raw.update(shards={}), "'shards' must be a list"),
    (lambda raw: raw["shards"][0].update(bytes="12"), r"'shards\[0\]\.bytes' must be an integer"),
    (lambda raw: raw["shards"][0].pop("sha256"), r"shards\[0\] \(missing sha256\)"),
    (lambda raw: raw["shards"].append([1]), r"malformed shard entry shards\[1\]"),
    (lambda raw: raw.update(mean=[0.0]), "'mean' must be a list of 2 numbers"),
    (lambda raw: raw.update(std=None), "'std' must be a list of 2 numbers"),
    (lambda raw: raw.update(lengths_file=7), "'lengths_file' must be a string"),
    (lambda raw: raw.update(num_rejected=-1), "'num_rejected' must be >= 0"),
])
def test_malformed_index_fields_name_the_file_and_key(tmp_path, damage, message):
    write_dataset(tmp_path, [np.zeros((3, 2), np.float32)])
    raw = json.loads((tmp_path / "index.json").read_text())
    damage(raw)
    (tmp_path / "index.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=message) as e:
        F.read_index(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "index.json"))


def test_write_shard_is_atomic_and_returns_size_and_checksum(tmp_path, monkeypatch):
    table = F.sequences_to_table(np.arange(15, dtype=np.float32).reshape(5, 3), np.array([2, 3]), ["a", "b"],
                                 np.array([1, 2]), 3)
    size, digest = F.write_shard(tmp_path / "s.arrow", table)
    assert (size, digest) == ((tmp_path / "s.arrow").stat().st_size, F.file_sha256(tmp_path / "s.arrow"))
    assert F.open_shard(tmp_path / "s.arrow").equals(table)
    synced = []
    real_fsync_dir = F._fsync_dir
    monkeypatch.setattr(F, "_fsync_dir", lambda folder: (synced.append(folder), real_fsync_dir(folder)))
    F.write_shard(tmp_path / "t.arrow", table)
    assert synced == [tmp_path]  # the rename is made durable
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        F.write_shard(tmp_path / "s.arrow", table.slice(0, 1))
    assert F.open_shard(tmp_path / "s.arrow").equals(table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.arrow", "t.arrow"]


def test_verify_names_corrupt_and_truncated_shards(tmp_path):
    rng = np.random.default_rng(4)
    index = write_dataset(tmp_path, _heavy_tailed(rng, 40), shard_bytes=2048)
    first, second = (tmp_path / s.file for s in index.shards[:2])
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:-100])
    problems = F.verify_dataset(index)
    assert any(str(first) in p and "checksum" in p for p in problems)
    assert any(str(second) in p and "bytes" in p for p in problems)
    with pytest.raises(DataError, match="truncated"):
        F.open_shard(second)


def test_lengths_file_checked(tmp_path):
    index = write_dataset(tmp_path, [np.zeros((3, 2), np.float32)] * 5)
    np.save(tmp_path / F.LENGTHS_FILE, np.array([3, 3], np.int32))
    with pytest.raises(DataError, match="holds 2 lengths"):
        F.load_lengths(index)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    F.atomic_write_json(target, {"a": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        F.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_writer_failure_leaves_no_index(tmp_path):
    with pytest.raises(RuntimeError):
        with F.DatasetWriter(tmp_path, dim=2, shard_bytes=16) as w:
            w.add(np.zeros((3, 2), np.float32))
            raise RuntimeError("crash")
    assert not F.is_dataset(tmp_path)


def test_format_never_imports_torch():
    code = "import sys, streamtrain.format, streamtrain.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
