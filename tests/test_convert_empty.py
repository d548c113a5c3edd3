"""convert: an input file that holds nothing (0 bytes, only white space, only a BOM) is one rejected record at
`path:1` on every path: fast and precise, many small files batched, big files split into groups and
partials, both parser backends, and reuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamtrain import cli, dataset
from streamtrain import convert as cv
from streamtrain.errors import DataError

BACKENDS = ["orjson"] + (["simdjson"] if cv.parser_backend("auto").name == "simdjson" else [])
BOM = b"\xef\xbb\xbf"
FAILED_EXPORT = "nothing to convert \u2014 a failed export?"

BLANKS = {
    "empty": (b"", "empty file (0 bytes)"),
    "spaces": (b"  \n\t\r\n\n", "file holds only white space (7 bytes)"),
    "bom": (BOM, "file holds only a UTF-8 byte-order mark (3 bytes)"),
    "bom_and_spaces": (BOM + b"\n \r\n", "file holds only a UTF-8 byte-order mark and white space (7 bytes)"),
}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("STREAMTRAIN_JSON_BACKEND", request.param)
    return request.param


def _records(rng, n: int, dim: int = 3) -> list[str]:
    return [json.dumps(np.round(rng.random((int(rng.integers(2, 6)), dim)), 4).tolist()) for _ in range(n)]


def _rejects(out: Path) -> list[dict]:
    path = out / "rejects.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _fingerprint(out: Path):
    """What a dataset holds, whatever the file names: shard checksums, lengths, statistics, rejects."""
    index = dataset.read_index(out)
    return ([s.sha256 for s in index.shards], index.lengths().tobytes(), index.mean.tobytes(), index.std.tobytes(),
            _rejects(out), index.extra["num_records"])


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("kind", sorted(BLANKS))
def test_blank_file_is_one_reject_at_line_1(tmp_path, kind, suffix, backend):
    data, reason = BLANKS[kind]
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(_records(rng, 3)) + "\n")
    blank = src / f"m{suffix}"
    blank.write_bytes(data)
    (src / "z.json").write_text(_records(rng, 1)[0])

    r = cv.convert([src], tmp_path / "skip", workers=1, on_error="skip")
    assert (r.num_records, r.num_sequences, r.num_rejected) == (5, 4, 1)
    assert _rejects(tmp_path / "skip") == [{"path": str(blank), "line": 1, "reason": f"{reason}: {FAILED_EXPORT}"}]
    assert dataset.read_index(tmp_path / "skip").extra["num_records"] == 5

    with pytest.raises(DataError) as e:
        cv.convert([src], tmp_path / "fail", workers=1)
    assert str(e.value).startswith(f"{blank}:1: {reason}: {FAILED_EXPORT}") and "\n" not in str(e.value)
    assert not dataset.is_dataset(tmp_path / "fail")


def test_a_lone_empty_file_is_named_with_exit_2(tmp_path, capsys):
    (tmp_path / "export.jsonl").write_bytes(b"")
    args = ["convert", str(tmp_path / "export.jsonl"), "--out", str(tmp_path / "ds")]
    assert cli.main(args) == 2  # the vector width cannot be taken from it
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{tmp_path / 'export.jsonl'}:1: empty file (0 bytes)" in err
    assert cli.main(args + ["--dim", "3"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{tmp_path / 'export.jsonl'}:1: empty file (0 bytes)" in err
    assert cli.main(args + ["--dim", "3", "--on-error", "skip"]) == 2  # nothing valid left
    assert "no valid records: 1 seen, 1 rejected" in capsys.readouterr().err


def test_blank_files_among_many_small_json_files(tmp_path, backend):
    """Small .json files are parsed many to a block; the blank ones among them are each one reject."""
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    src.mkdir()
    blanks = {}
    for i, text in enumerate(_records(rng, 240)):
        path = src / f"fn-{i:04d}.json"
        if i % 60 == 7:
            data = list(BLANKS.values())[i // 60][0]
            path.write_bytes(data)
            blanks[str(path)] = data
        else:
            path.write_text(text)
    results = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        r = cv.convert([src], out, workers=workers, on_error="skip", shard_mb=0.01)
        assert r.groups_built > 2
        assert (r.num_records, r.num_rejected, r.num_sequences) == (240, 4, 236)
        assert [(x["path"], x["line"]) for x in _rejects(out)] == [(p, 1) for p in sorted(blanks)]
        assert all(FAILED_EXPORT in x["reason"] for x in _rejects(out))
        results.append(_fingerprint(out))
    assert results[0] == results[1]


@pytest.mark.parametrize("shard_mb", [0.1, 1.0])
def test_big_blank_files_split_into_groups_or_partials(tmp_path, shard_mb, backend):
    """A blank file bigger than a shard is split into several groups (shard_mb 0.1), or, as the only group
    with two workers, into partial tasks (shard_mb 1): it is still exactly one reject, and a big file that
    only starts blank is not one."""
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-big-blank.jsonl").write_bytes(b"\n" * 300_000 + b" \t\r\n" * 100_000)
    (src / "b-big-blank.json").write_bytes(BOM + b" \n" * 300_000)
    late = _records(rng, 50)
    (src / "c-starts-blank.jsonl").write_bytes(b"\n" * 400_000 + "\n".join(late).encode() + b"\n")
    (src / "d.jsonl").write_text("\n".join(_records(rng, 20)) + "\n")
    results = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        r = cv.convert([src], out, workers=workers, on_error="skip", shard_mb=shard_mb)
        if shard_mb < 1:
            assert r.groups_built >= 8
        assert (r.num_records, r.num_rejected, r.num_sequences) == (72, 2, 70)
        assert _rejects(out) == [
            {"path": str(src / "a-big-blank.jsonl"), "line": 1,
             "reason": f"file holds only white space (700000 bytes): {FAILED_EXPORT}"},
            {"path": str(src / "b-big-blank.json"), "line": 1,
             "reason": f"file holds only a UTF-8 byte-order mark and white space (600003 bytes): {FAILED_EXPORT}"},
        ]
        index = dataset.read_index(out)
        lines = [ln for s in index.shards for p, ln in zip(*(dataset.open_shard(out / s.file).column(c).to_pylist()
                                                              for c in ("path", "line"))) if p.endswith("c-starts-blank.jsonl")]
        assert lines == list(range(400_001, 400_051))
        results.append(_fingerprint(out))
    assert results[0] == results[1]
    with pytest.raises(DataError, match=r"a-big-blank\.jsonl:1: file holds only white space"):
        cv.convert([src], tmp_path / "fail", workers=2, shard_mb=shard_mb)


def test_reused_groups_keep_reporting_the_blank_file(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}.jsonl").write_text("\n".join(_records(rng, 30)) + "\n")
    (src / "f3-empty.jsonl").write_bytes(b"")
    out = tmp_path / "out"
    first = cv.convert([src], out, workers=1, on_error="skip", shard_mb=0.002)
    again = cv.convert([src], out, workers=2, on_error="skip", shard_mb=0.002)
    assert again.groups_built == 0 and again.groups_reused == first.groups_built > 3
    assert (again.num_records, again.num_rejected) == (first.num_records, first.num_rejected) == (181, 1)
    assert _rejects(out) == [{"path": str(src / "f3-empty.jsonl"), "line": 1,
                              "reason": f"empty file (0 bytes): {FAILED_EXPORT}"}]
