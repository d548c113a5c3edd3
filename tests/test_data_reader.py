import gc
import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from conftest import write_dataset

from streamtrain.data.reader import ShardReader, sequence_views
from streamtrain.dataset import (
    ShardInfo,
    file_sha256,
    open_shard,
    read_index,
    sequences_to_table,
    write_index,
)
from streamtrain.errors import DataError

DIM = 5


def _sequences(n=117, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.maximum(0, np.round(rng.lognormal(np.log(20), 1.2, n))).astype(int)
    lengths[3] = 0  # an empty sequence is still a sequence
    return [rng.standard_normal((int(t), DIM)).astype(np.float32) for t in lengths]


@pytest.fixture
def dataset(tmp_path):
    seqs = _sequences()
    index = write_dataset(tmp_path / "ds", seqs, shard_bytes=8_000)
    assert len(index.shards) > 3
    return tmp_path / "ds", seqs


def test_every_sequence_reads_back_bit_exact_as_a_view(dataset):
    root, seqs = dataset
    reader = ShardReader(root)
    assert len(reader) == len(seqs)
    for i, s in enumerate(seqs):
        v = reader.sequence(i)
        assert v.shape == s.shape and v.dtype == np.float32
        assert np.array_equal(v, s)
        assert not v.flags.owndata and not v.flags.writeable  # a view into the read-only map


def test_sequence_rejects_out_of_range_ids(dataset):
    reader = ShardReader(dataset[0])
    with pytest.raises(IndexError):
        reader.sequence(len(dataset[1]))


def test_reader_pickles_without_maps_and_reopens(dataset):
    root, seqs = dataset
    reader = ShardReader(root)
    before = len(pickle.dumps(reader))
    reader.sequence(50)
    clone = pickle.loads(pickle.dumps(reader))
    assert len(pickle.dumps(reader)) == before
    assert np.array_equal(clone.sequence(50), seqs[50])


def test_gather_copies_windows_and_leaves_padding_alone(dataset):
    root, seqs = dataset
    reader = ShardReader(root)
    ids = np.array([0, 116, 40, 3])
    offsets = np.array([0, 1, 2, 0])
    lengths = np.array([min(4, len(seqs[0])), 3, 2, 0])
    out = np.full((4, 8, DIM), 7.0, np.float32)
    reader.gather(out, ids, offsets, lengths)
    for j, (i, o, n) in enumerate(zip(ids, offsets, lengths)):
        assert np.array_equal(out[j, :n], seqs[i][o : o + n])
        assert (out[j, n:] == 7.0).all()
    reader.gather(out, ids, offsets, lengths, zero_padding=True)  # e.g. a reused buffer
    for j, (i, o, n) in enumerate(zip(ids, offsets, lengths)):
        assert np.array_equal(out[j, :n], seqs[i][o : o + n])
        assert not out[j, n:].any()


def test_gather_into_a_strided_out_matches_a_contiguous_one(dataset):
    root, seqs = dataset
    reader = ShardReader(root)
    ids = np.array([i for i in (5, 116, 40, 3, 77, 9, 60, 101) if len(seqs[i]) >= 2][:5])
    assert len(ids) == 5
    offsets = np.array([0, 1, 0, 1, 0])
    lengths = np.array([max(0, min(5, len(seqs[i]) - o)) for i, o in zip(ids, offsets)])
    assert lengths.sum() > 10
    contiguous = np.full((5, 6, DIM), 3.0, np.float32)
    reader.gather(contiguous, ids, offsets, lengths, zero_padding=True)
    wide = np.full((5, 9, DIM), 3.0, np.float32)
    strided = wide[:, :6]  # rows 9 vectors apart: not C-contiguous
    assert not strided.flags.c_contiguous
    reader.gather(strided, ids, offsets, lengths, zero_padding=True)
    assert np.array_equal(strided, contiguous)
    assert (wide[:, 6:] == 3.0).all()  # nothing written past the view
    for j, (i, o, n) in enumerate(zip(ids, offsets, lengths)):
        assert np.array_equal(contiguous[j, :n], seqs[i][o : o + n])
        assert not contiguous[j, n:].any()
    empty = np.zeros((2, 0, DIM), np.float32)
    reader.gather(empty, ids[:2], np.zeros(2, np.int64), np.zeros(2, np.int64), zero_padding=True)


def test_views_honour_record_batches_and_array_offsets():
    rng = np.random.default_rng(1)
    lengths = np.array([3, 0, 5, 2, 4, 1, 6])
    values = rng.standard_normal((lengths.sum(), DIM)).astype(np.float32)
    table = sequences_to_table(values, lengths, ["x"] * 7, np.arange(7), DIM)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    # slices give nonzero offsets on the list and on its fixed_size_list child
    sliced = pa.Table.from_batches(table.slice(1, 3).to_batches() + table.slice(5, 2).to_batches())
    views = sequence_views(sliced, DIM)
    rows = [1, 2, 3, 5, 6]
    for r, i in enumerate(rows):
        vectors, start, end = views.locate(r)
        assert np.array_equal(vectors[start:end], values[starts[i] : starts[i + 1]])


def test_shard_with_many_record_batches_reads_back(dataset):
    root, seqs = dataset
    index = read_index(root)
    info = index.shards[0]
    path = root / info.file
    table = open_shard(path)
    tmp = path.with_suffix(".tmp")  # never rewrite a mapped file in place
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    tmp.replace(path)
    assert open_shard(path).column("sequence").num_chunks > 1
    index.shards[0] = ShardInfo(info.file, info.num_sequences, info.num_tokens, path.stat().st_size,
                                file_sha256(path), info.first_id)
    write_index(index)
    reader = ShardReader(root)
    for i in range(info.num_sequences):
        assert np.array_equal(reader.sequence(i), seqs[i])
    # one gather across the record batches of shard 0 and rows of the next shard, windows offset by one
    ids = np.concatenate([np.arange(info.num_sequences)[::-1], [info.num_sequences, info.num_sequences + 1]])
    offsets = np.array([1 if len(seqs[i]) > 1 else 0 for i in ids])
    lengths = np.array([len(seqs[i]) - o for i, o in zip(ids, offsets)])
    out = np.full((len(ids), int(lengths.max()), DIM), 5.0, np.float32)
    reader.gather(out, ids, offsets, lengths, zero_padding=True)
    for j, (i, o, n) in enumerate(zip(ids, offsets, lengths)):
        assert np.array_equal(out[j, :n], seqs[i][o:])
        assert not out[j, n:].any()


def test_missing_shard_raises_data_error_naming_it(dataset):
    root, _ = dataset
    reader = ShardReader(root)
    shard = read_index(root).shards[1]
    (root / shard.file).unlink()
    with pytest.raises(DataError, match=shard.file.split("/")[-1] + ".*missing"):
        reader.sequence(shard.first_id)


def test_truncated_shard_raises_data_error_naming_it(dataset):
    root, _ = dataset
    shard = read_index(root).shards[2]
    path = root / shard.file
    path.write_bytes(path.read_bytes()[: shard.bytes // 2])
    with pytest.raises(DataError, match=path.name):
        ShardReader(root).sequence(shard.first_id)


def test_shard_that_disagrees_with_lengths_file_is_rejected(dataset):
    root, _ = dataset
    index = read_index(root)
    lengths = np.load(root / "lengths.npy")
    lengths[0] += 1
    np.save(root / "lengths.npy", lengths)
    index.lengths_sha256 = file_sha256(root / "lengths.npy")  # an index consistent with the wrong lengths
    write_index(index)
    with pytest.raises(DataError, match="lengths differ"):
        ShardReader(read_index(root)).sequence(0)


def test_reader_and_bucketing_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys, streamtrain.data.reader, streamtrain.data.bucketing; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _mapped_shard_files(root, pid="self"):
    """Distinct shard files of `root` mapped into process `pid` (from /proc/PID/maps)."""
    shards = os.path.realpath(root / "shards")
    with open(f"/proc/{pid}/maps") as f:
        return {line.split(maxsplit=5)[-1].strip() for line in f if shards in line}


def test_open_maps_are_bounded_and_views_outlive_their_eviction(dataset):
    root, seqs = dataset
    num_shards = len(read_index(root).shards)
    reader = ShardReader(root, max_open_shards=2)
    views = [reader.sequence(i) for i in range(len(seqs))]
    assert reader.num_open_shards == 2
    assert len(_mapped_shard_files(root)) == num_shards  # evicted maps live on while a view of them does
    gc.collect()
    assert all(np.array_equal(v, s) for v, s in zip(views, seqs))
    del views
    gc.collect()
    assert len(_mapped_shard_files(root)) == 2
    # one batch across every shard: each evicted while the batch is gathered, still copied right
    ids = np.arange(len(seqs))[::-1].copy()
    lengths = np.array([min(len(seqs[i]), 6) for i in ids])
    out = np.zeros((len(ids), 6, DIM), np.float32)
    reader.gather(out, ids, np.zeros(len(ids), np.int64), lengths, zero_padding=True)
    for j, i in enumerate(ids):
        assert np.array_equal(out[j, : lengths[j]], seqs[i][: lengths[j]])
    assert reader.num_open_shards == 2 and len(_mapped_shard_files(root)) == 2
    with pytest.raises(ValueError, match="max_open_shards"):
        ShardReader(root, max_open_shards=0)


def test_data_checks_hold_under_python_O(dataset):
    """gather's window bound and the ring's sizes are real checks, not asserts that -O strips."""
    root, seqs = dataset
    index = read_index(root)
    shard = next(s for s in index.shards if s.num_sequences >= 2)
    i = next(i for i in range(shard.first_id, shard.first_id + shard.num_sequences - 1)
             if len(seqs[i]) >= 2 and len(seqs[i + 1]) >= 1)  # a window past its end would run into row i + 1
    n = len(seqs[i])
    code = f"""
import numpy as np
from streamtrain.data.reader import ShardReader
from streamtrain.data.transport import BatchRing
from streamtrain.errors import DataError
try:
    assert False
    print("asserts stripped")
except AssertionError:
    print("asserts are on")
reader = ShardReader({str(root)!r})
out = np.zeros((1, {n + 1}, {DIM}), np.float32)
for offset, length, label in ((1, {n}, "past the end"), (0, {n + 1}, "longer than the sequence")):
    try:
        reader.gather(out, np.array([{i}]), np.array([offset]), np.array([length]))
        print("copied", label)
    except DataError as e:
        print("DataError:", e)
for make in (lambda: BatchRing(0, 1, 4), lambda: BatchRing(1, 1, 4).slot(0, 0, (2, 3))):
    try:
        make()
        print("no error")
    except ValueError as e:
        print("ValueError:", e)
"""
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0] == "asserts stripped", out
    lines = lines[1:]
    assert len(lines) == 4, out
    assert lines[0].startswith("DataError:") and f"sequence {i} has {n} vectors" in lines[0] and "shard-" in lines[0]
    assert lines[1].startswith("DataError:") and f"[0, {n + 1})" in lines[1]
    assert lines[2].startswith("ValueError:") and "num_workers=0" in lines[2]
    assert lines[3].startswith("ValueError:") and "exceeds the slot size 4" in lines[3]


def test_retain_unmaps_every_other_shard_and_a_dropped_one_reopens(dataset):
    root, seqs = dataset
    reader = ShardReader(root)
    firsts = reader.index.shard_offsets[:-1].tolist()
    for i in firsts:
        reader.sequence(int(i))
    assert reader.num_open_shards == len(firsts)
    reader.retain([1, 2])
    assert reader.num_open_shards == 2
    assert np.array_equal(reader.sequence(int(firsts[0])), seqs[int(firsts[0])])  # mapped again on use
    assert reader.num_open_shards == 3
    reader.retain([])
    assert reader.num_open_shards == 0
