"""Tests for streamtrain.dataset.summary and `streamtrain inspect`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from streamtrain import cli, dataset
from streamtrain.dataset.summary import length_summary, render_text, summarize


def _dataset(root, n=117, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.minimum(np.exp(rng.normal(np.log(30), 1.2, n)).astype(int) + 2, 3000)
    with dataset.DatasetWriter(root, dim=dim, shard_bytes=20_000) as w:
        for i, t in enumerate(lengths):
            w.add(rng.standard_normal((t, dim)).astype(np.float32), path="a.jsonl", line=i + 1)
    return lengths


def test_length_summary_quantiles_and_log_histogram():
    lengths = np.array([2, 3, 3, 5, 8, 13, 21, 34, 55, 89, 144, 1000, 1001])
    s = length_summary(lengths, max_bins=8)
    assert (s.min, s.max) == (2, 1001)
    # 13 sorted values, linear interpolation between order statistics: p50 is the 7th value (21); p90 sits
    # at position 0.9 * 12 = 10.8 (between 144 and 1000); p99 at 11.88 (between 1000 and 1001)
    assert s.p50 == 21.0
    assert s.p90 == pytest.approx(144 + 0.8 * (1000 - 144))
    assert s.p99 == pytest.approx(1000.88)
    assert s.mean == pytest.approx(2378 / 13)
    assert sum(s.counts) == len(lengths) and s.bin_edges[0] == 2 and s.bin_edges[-1] == 1002
    widths = np.diff(s.bin_edges)
    assert widths[-1] > 10 * widths[0]  # log-spaced
    assert length_summary(np.zeros(0, np.int32)).counts == []
    assert length_summary(np.array([7, 7, 7])).counts == [3]


def test_summarize_and_text(tmp_path):
    lengths = _dataset(tmp_path / "ds")
    s = summarize(tmp_path / "ds")
    assert (s.num_sequences, s.num_tokens, s.dim) == (117, int(lengths.sum()), 5)
    assert len(s.shards) > 1 and s.problems is None
    text = render_text(s)
    assert "sequences 117" in text and "p99" in text and "histogram" in text and "shard-000000" in text


def test_inspect_json_and_verify(tmp_path, capsys):
    lengths = _dataset(tmp_path / "ds")
    assert cli.main(["inspect", str(tmp_path / "ds"), "--json", "--verify"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["num_sequences"] == 117 and obj["num_tokens"] == int(lengths.sum()) and obj["dim"] == 5
    assert obj["verified"] is True and obj["num_rejected"] == 0 and len(obj["mean"]) == 5
    assert obj["lengths"]["max"] == int(lengths.max())
    # Corrupt one shard: --verify names it and exits 2.
    shard = tmp_path / "ds" / dataset.read_index(tmp_path / "ds").shards[1].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli.main(["inspect", str(tmp_path / "ds"), "--verify"]) == 2
    captured = capsys.readouterr()
    assert "shard-000001.arrow: checksum mismatch" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_inspect_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "missing"):
        p = subprocess.run([sys.executable, "-m", "streamtrain", "inspect", str(target)], capture_output=True, text=True)
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_inspect_of_a_malformed_index_is_one_line(tmp_path):
    _dataset(tmp_path / "ds", n=9)
    raw = json.loads((tmp_path / "ds" / "index.json").read_text())
    raw["format_version"] = "1"
    (tmp_path / "ds" / "index.json").write_text(json.dumps(raw))
    p = subprocess.run([sys.executable, "-m", "streamtrain", "inspect", str(tmp_path / "ds")], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "index.json: key 'format_version' must be an integer" in p.stderr


def test_rich_and_text_reports_show_the_lengths(tmp_path, capsys):
    from streamtrain.commands.inspect import _print_rich

    # 13 sequences of known lengths: every figure below is worked out by hand
    lengths = [2, 3, 3, 5, 8, 13, 21, 34, 55, 89, 144, 1000, 1001]
    rng = np.random.default_rng(0)
    with dataset.DatasetWriter(tmp_path / "ds", dim=3) as w:
        for i, t in enumerate(lengths):
            w.add(rng.standard_normal((t, 3)).astype(np.float32), path="a.jsonl", line=i + 1)
    s = summarize(tmp_path / "ds")
    text = render_text(s)
    _print_rich(s)
    rich_out = capsys.readouterr().out
    expected = "min 2  p50 21  p90 828.8  p99 1000.88  max 1001  mean 182.9"
    assert expected in text and expected in rich_out
    # the first histogram bin starts at the shortest length and holds it alone (log-spaced edges 2, 3, ...)
    assert s.lengths.bin_edges[:2] == [2, 3] and s.lengths.counts[0] == 1
    assert "2-2" in rich_out and f"{2:>7}-{2:<7} {1:>10,}" in text
    # the last bin ends at the longest length and holds the two longest sequences
    assert s.lengths.counts[-1] >= 2 and f"-{1001:<7}" in text and "-1001" in rich_out
    assert sum(s.lengths.counts) == 13


@pytest.mark.slow
def test_inspect_never_imports_torch(tmp_path):
    _dataset(tmp_path / "ds", n=9)
    code = ("import sys, streamtrain.cli; rc = streamtrain.cli.main(['inspect', sys.argv[1], '--verify']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ds")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
