import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_dataset

from streamtrain import dataset as F
from streamtrain.errors import DataError


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
    from streamtrain.dataset import io as dataset_io

    real_fsync_dir = dataset_io.fsync_dir
    monkeypatch.setattr(dataset_io, "fsync_dir", lambda folder: (synced.append(folder), real_fsync_dir(folder)))
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
    problems = F.verify_dataset(F.read_index(tmp_path))
    assert any(str(first) in p and "checksum" in p for p in problems)
    assert any(str(second) in p and "bytes" in p for p in problems)
    with pytest.raises(DataError, match="truncated"):
        F.open_shard(second)


def test_lengths_file_checked(tmp_path):
    index = write_dataset(tmp_path, [np.zeros((3, 2), np.float32)] * 5)
    np.save(tmp_path / index.lengths_file, np.array([3, 3], np.int32))
    with pytest.raises(DataError, match="holds 2 lengths"):
        F.load_lengths(F.read_index(tmp_path))


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


def _sequences_of(root) -> list[bytes]:
    index = F.read_index(root)
    return [np.asarray(row, np.float32).tobytes() for s in index.shards
            for row in F.open_shard(root / s.file).column("sequence").to_pylist()]


def _only_named_files(root) -> None:
    """The folder holds index.json, the lock and exactly the files the index names: no leftovers."""
    index = F.read_index(root)
    found = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert found == {s.file for s in index.shards} | {index.lengths_file, "index.json", ".convert.lock"}


def test_writer_rewrite_leaves_no_stale_shards_and_never_reuses_a_current_name(tmp_path):
    rng = np.random.default_rng(5)
    first = write_dataset(tmp_path, _heavy_tailed(rng, 60), shard_bytes=2048)
    assert len(first.shards) > 4 and first.lengths_file == F.LENGTHS_FILE  # a new folder: the plain names
    second_seqs = _heavy_tailed(rng, 7)
    second = write_dataset(tmp_path, second_seqs, shard_bytes=1 << 20)
    assert len(second.shards) == 1
    assert not ({s.file for s in first.shards} | {first.lengths_file}) & ({s.file for s in second.shards} | {second.lengths_file})
    assert F.verify_dataset(second) == []
    assert _sequences_of(tmp_path) == [s.tobytes() for s in second_seqs]
    _only_named_files(tmp_path)
    third = write_dataset(tmp_path, second_seqs, shard_bytes=1 << 20)
    assert not {s.file for s in second.shards} & {s.file for s in third.shards}
    assert second.lengths_file != third.lengths_file
    _only_named_files(tmp_path)


def test_writer_exception_keeps_the_previous_dataset(tmp_path):
    rng = np.random.default_rng(6)
    old = write_dataset(tmp_path, _heavy_tailed(rng, 30), shard_bytes=2048)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="crash"):
        with F.DatasetWriter(tmp_path, dim=5, shard_bytes=512) as w:
            for seq in _heavy_tailed(rng, 30):
                w.add(seq)
            raise RuntimeError("crash")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert F.verify_dataset(F.read_index(tmp_path)) == [] and F.read_index(tmp_path).shards == old.shards


_WRITER_CRASH = r"""
import os, sys
from pathlib import Path
import numpy as np
from streamtrain.dataset import writer as F  # the module whose names DatasetWriter calls

root, point = Path(sys.argv[1]), sys.argv[2]
calls = []

def exit_on(name, n, before=False):
    real = getattr(F, name)
    def wrapper(*args, **kwargs):
        calls.append(name)
        if before and calls.count(name) == n:
            os._exit(86)
        result = real(*args, **kwargs)
        if calls.count(name) == n:
            os._exit(86)
        return result
    setattr(F, name, wrapper)

def install_one(root, moves):
    staged, name = list(moves)[0]
    os.replace(staged, Path(root) / name)
    os._exit(86)

if point == "staged":
    exit_on("write_shard", 2)
elif point == "installing":
    F.install_shards = install_one
elif point == "lengths":
    exit_on("atomic_write_bytes", 1)
elif point == "index":
    exit_on("write_index", 1, before=True)
elif point == "leftovers":
    exit_on("collect_leftovers", 2, before=True)
rng = np.random.default_rng(int(sys.argv[3]))
with F.DatasetWriter(root, dim=3, shard_bytes=600) as w:
    for _ in range(40):
        w.add(rng.standard_normal((int(rng.integers(2, 20)), 3)).astype(np.float32))
"""


@pytest.mark.parametrize("point", ["staged", "installing", "lengths", "index", "leftovers"])
def test_writer_killed_at_any_step_leaves_a_complete_dataset(tmp_path, point):
    root = tmp_path / "ds"
    run = lambda seed, point: subprocess.run([sys.executable, "-c", _WRITER_CRASH, str(root), point, str(seed)],
                                             capture_output=True, text=True, timeout=120)
    assert run(1, "none").returncode == 0
    old = _sequences_of(root)
    p = run(2, point)
    assert p.returncode == 86, p.stderr
    assert F.verify_dataset(F.read_index(root)) == []
    after_crash = _sequences_of(root)
    # A later writer deletes what the killed one left and commits as usual.
    assert run(2, "none").returncode == 0
    new = _sequences_of(root)
    assert old != new
    # Up to index.json the previous dataset is the dataset; once it is written, the new one is complete.
    assert after_crash == (new if point == "leftovers" else old)
    _only_named_files(root)


def test_writer_and_convert_take_the_same_lock(tmp_path):
    from streamtrain.convert import convert
    from streamtrain.errors import UserError

    (tmp_path / "a.jsonl").write_text("[[1, 2], [3, 4]]\n")
    with F.DatasetWriter(tmp_path / "ds", dim=2) as w:
        w.add(np.zeros((3, 2), np.float32))
        with pytest.raises(UserError, match="another streamtrain process"):
            convert([tmp_path / "a.jsonl"], tmp_path / "ds", workers=1)
        with pytest.raises(UserError, match="another streamtrain process"):
            F.DatasetWriter(tmp_path / "ds", dim=2).__enter__()
    with open(tmp_path / "ds" / ".convert.lock", "a") as held:  # as a running convert holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another streamtrain process"):
            write_dataset(tmp_path / "ds", [np.ones((2, 2), np.float32)])
    assert convert([tmp_path / "a.jsonl"], tmp_path / "ds", workers=1).num_sequences == 1


def test_format_never_imports_torch():
    code = "import sys, streamtrain.dataset, streamtrain.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
