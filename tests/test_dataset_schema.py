"""sequences_to_table builds its arrays from their buffers: the same table pa.array() builds, and never
the pandas import pa.array() pays on its first call (which every convert worker would pay)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from streamtrain.dataset import sequences_to_table, shard_schema

ROOT = Path(__file__).resolve().parent.parent


def _reference(values, lengths, paths, lines, dim):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1).astype(np.float32), type=pa.float32()), dim)
    return pa.Table.from_arrays(
        [pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), vectors),
         pa.array(np.asarray(lengths).astype(np.int32), type=pa.int32()),
         pa.array(paths, type=pa.string()), pa.array(np.asarray(lines), type=pa.int64())],
        schema=shard_schema(dim))


@pytest.mark.parametrize("num_rows", [0, 1, 117])
def test_table_equals_the_pa_array_reference(num_rows):
    rng = np.random.default_rng(num_rows)
    dim = 5
    lengths = rng.integers(0, 9, size=num_rows)
    values = rng.standard_normal((int(lengths.sum()), dim)).astype(np.float32)
    values[::7] = -0.0
    paths = [rng.choice(["a.jsonl", "dir/ü€𝄞.json", "", "x" * 300]) for _ in range(num_rows)]
    lines = rng.integers(1, 2**40, size=num_rows)
    got = sequences_to_table(values, lengths, paths, lines, dim)
    want = _reference(values, lengths, paths, lines, dim)
    got.validate(full=True)
    assert got.equals(want)
    assert got.schema.equals(want.schema, check_metadata=True)
    flat = got.column("sequence").combine_chunks().values.values.to_numpy()
    assert flat.view(np.uint32).tolist() == values.reshape(-1).view(np.uint32).tolist()  # bit-exact, -0.0 kept


def test_a_path_that_is_not_utf8_fails_as_before():
    with pytest.raises(UnicodeEncodeError):
        sequences_to_table(np.zeros((2, 1), np.float32), np.array([2]), ["bad\udcff.json"], np.array([1]), 1)


def test_convert_never_imports_pandas(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("[[1, 2], [3, 4]]\n[[5, 6], [7, 8], [9, 10]]\n")
    code = ("import sys\nfrom streamtrain.convert import convert\n"
            f"convert([{str(tmp_path / 'in')!r}], {str(tmp_path / 'out')!r}, workers=1)\n"
            "print('pandas' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "out" / "index.json").is_file()
