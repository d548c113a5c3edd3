"""Tests for streamtrain.convert: parsing contract, rejects, formats, determinism, reuse, crash safety."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from streamtrain import convert as cv
from streamtrain import dataset
from streamtrain.errors import DataError, UserError

DIM = 28
BACKENDS = ["orjson"] + (["simdjson"] if cv.parser_backend("auto").name == "simdjson" else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("STREAMTRAIN_JSON_BACKEND", request.param)
    return request.param


def _vec_text(rng, dim=DIM) -> list[str]:
    """Decimal texts like real encodings: mostly 0/1 integers, some 6-significant-digit floats."""
    out = []
    for j in range(dim):
        if j < dim - 6:
            out.append(str(int(rng.integers(0, 2))))
        else:
            out.append(f"{rng.random() * 10.0 ** rng.integers(-3, 3):.6g}")
    return out


def _record(vectors: list[list[str]]) -> str:
    return "[" + ", ".join("[" + ", ".join(v) + "]" for v in vectors) + "]"


def _expected(vectors: list[list[str]]) -> np.ndarray:
    return np.array([[np.float32(float(t)) for t in v] for v in vectors], dtype=np.float32)


def _read_dataset(root) -> list[tuple[str, int, np.ndarray]]:
    index = dataset.read_index(root)
    rows = []
    for s in index.shards:
        t = dataset.open_shard(Path(root) / s.file)
        for seq, path, line in zip(t.column("sequence").to_pylist(), t.column("path").to_pylist(), t.column("line").to_pylist()):
            rows.append((path, line, np.array(seq, dtype=np.float32)))
    return rows


def _write_corpus(folder: Path, n_files=7, records_per_file=17, seed=0) -> dict[tuple[str, int], list[list[str]]]:
    """Mixed .jsonl and .json files; returns {(path, line): vectors as text}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for f in range(n_files):
        if f % 3 == 2:
            path = folder / "sub" / f"single-{f:02d}.json"
            path.parent.mkdir(exist_ok=True)
            vecs = [_vec_text(rng) for _ in range(int(rng.integers(2, 40)))]
            path.write_text(_record(vecs))
            expected[(os.path.normpath(str(path)), 1)] = vecs
            continue
        path = folder / f"part-{f:02d}.jsonl"
        lines = []
        for r in range(records_per_file):
            vecs = [_vec_text(rng) for _ in range(int(rng.integers(2, 60)))]
            lines.append(_record(vecs))
            expected[(os.path.normpath(str(path)), r + 1)] = vecs
        path.write_text("\n".join(lines) + "\n")
    return expected


def _check_matches(out: Path, expected: dict) -> None:
    rows = _read_dataset(out)
    assert len(rows) == len(expected)
    for path, line, arr in rows:
        want = _expected(expected[(path, line)])
        assert arr.tobytes() == want.tobytes(), (path, line)


# ---------------------------------------------------------------------------------------------------------
# Values


def _tricky_decimals(rng, n=300) -> list[str]:
    """Decimal texts on and around float32 rounding midpoints (double rounding happens there), and integers."""
    texts = []
    for x in rng.standard_normal(n).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, n).astype(np.float32):
        x = np.float32(x)
        y = np.nextafter(x, np.float32(np.inf), dtype=np.float32)
        mid = (Decimal(float(x)) + Decimal(float(y))) / 2  # exact midpoint between two float32 neighbours
        ulp64 = Decimal(float(np.spacing(np.float64(float(mid)))))
        for d in (mid, mid + ulp64 / 4, mid - ulp64 / 4, mid + ulp64 * 3 / 4):
            texts.append(format(d, "f") if abs(d) > Decimal("1e-5") and abs(d) < Decimal("1e15") else format(d, "e"))
        texts.append(f"{float(x):.9g}")
        texts.append(repr(float(mid)))
    texts += ["0", "-0", "-0.0", "1", "16777217", "16777219", "9007199254740993", "18446744073709551615",
              "123456789012345678901234567890", "-123456789012345678901234567890", "3.4028234663852886e38",
              "-3.4028234663852886e38", "1e-46", "1.401298464324817e-45", "7.0064923216240854e-46", "1E3", "2.5e+2"]
    return texts


def test_values_are_float32_of_the_float64_parse_bit_exact(tmp_path, backend):
    texts = _tricky_decimals(np.random.default_rng(1))
    texts += ["0"] * (-len(texts) % DIM)
    vectors = [texts[i:i + DIM] for i in range(0, len(texts), DIM)]
    src = tmp_path / "v.jsonl"
    # One record of everything, one record per pair of vectors, so both block and per-record paths see them.
    lines = [_record(vectors)] + [_record(vectors[i:i + 2]) for i in range(0, len(vectors) - 1, 2)]
    src.write_text("\n".join(lines) + "\n")
    cv.convert([src], tmp_path / "out", workers=1)
    rows = _read_dataset(tmp_path / "out")
    assert rows[0][2].tobytes() == _expected(vectors).tobytes()
    for k, (_, line, arr) in enumerate(rows[1:]):
        assert arr.tobytes() == _expected(vectors[2 * k:2 * k + 2]).tobytes(), line


def test_parse_record_matches_numpy_of_float_of_text():
    texts = _tricky_decimals(np.random.default_rng(2), n=50)[:56]
    arr = cv.parse_record("[" + ",".join(f"[{a},{b}]" for a, b in zip(texts[0::2], texts[1::2])) + "]", dim=2)
    assert arr.reshape(-1).tobytes() == np.array([np.float32(float(t)) for t in texts], np.float32).tobytes()


_F32_BOUNDARY_TEXTS = [
    "3.4028234663852886e+38", "3.4028235e+38", "3.40282356e+38", "3.4028235677973362e+38", "3.4028235677973366e+38",
    "3.4028235677973366e38", "3.402823567797337e+38", "3.4028236e+38", "3.4028236692093846e+38", "3.5e+38", "1e39",
    "340282356779733661637539395458142568447", "340282356779733661637539395458142568448",
]


def test_float32_overflow_rule_is_exactly_numpy_rounding(tmp_path, backend):
    """A value is kept exactly when np.float32(float(text)) is finite, on both paths (block and per record)."""
    texts = _F32_BOUNDARY_TEXTS + ["-" + t for t in _F32_BOUNDARY_TEXTS]
    with np.errstate(over="ignore"):
        finite = {t: bool(np.isfinite(np.float32(float(t)))) for t in texts}
    # 2**128 - 2**103 (3.4028235677973366e+38) is the midpoint between float32 max and 2**128: it rounds (to
    # even) to infinity, and the double just below it rounds to float32 max.
    assert finite["3.4028235e+38"] and finite["3.4028235677973362e+38"]
    assert not finite["3.4028235677973366e+38"] and not finite["3.4028236e+38"]
    lines = [f"[[1, 2], [{t}, 4]]" for t in texts]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("\n".join(lines) + "\n")
    r = cv.convert([tmp_path / "src"], tmp_path / "out", workers=1, on_error="skip")
    kept = {line: arr for _, line, arr in _read_dataset(tmp_path / "out")}
    for i, t in enumerate(texts):
        assert (i + 1 in kept) == finite[t], t
        with np.errstate(over="ignore"):
            want = np.float32(float(t))
        if finite[t]:
            assert kept[i + 1][1, 0] == want
            assert cv.parse_record(lines[i])[1, 0] == want
        else:
            with pytest.raises(cv.RecordError, match="overflows float32"):
                cv.parse_record(lines[i])
    assert r.num_rejected == sum(not f for f in finite.values())
    # A block of only finite values takes the fast path and agrees with the rule as well.
    ok = [f"[[1, 2], [{t}, 4]]" for t in texts if finite[t]]
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "b.jsonl").write_text("\n".join(ok) + "\n")
    r_ok = cv.convert([tmp_path / "ok"], tmp_path / "out_ok", workers=1)
    assert (r_ok.num_sequences, r_ok.num_records_fast) == (len(ok), len(ok))


def test_round_trip_mixed_corpus(tmp_path, backend):
    expected = _write_corpus(tmp_path / "src")
    result = cv.convert([tmp_path / "src"], tmp_path / "out", workers=1)
    _check_matches(tmp_path / "out", expected)
    assert result.num_sequences == len(expected) == result.num_records
    index = dataset.read_index(tmp_path / "out")
    assert dataset.verify_dataset(index) == []
    all_values = np.concatenate([a for _, _, a in _read_dataset(tmp_path / "out")]).astype(np.float64)
    np.testing.assert_allclose(index.mean, all_values.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(index.std, all_values.std(0), rtol=1e-9, atol=1e-12)
    assert list(index.lengths()) == [len(a) for _, _, a in _read_dataset(tmp_path / "out")]


# ---------------------------------------------------------------------------------------------------------
# Input forms


def test_bom_crlf_blank_lines_pretty_json_and_objects(tmp_path, backend):
    rng = np.random.default_rng(3)
    v = [[_vec_text(rng, 3) for _ in range(n)] for n in (2, 3, 4, 5, 2)]
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + f"{_record(v[0])}\r\n\r\n   \r\n{_record(v[1])}\r\n".encode())
    (src / "b.json").write_text(json.dumps([[float(t) if "." in t else int(t) for t in vec] for vec in v[2]], indent=2))
    (src / "c.json").write_text(f"{_record(v[3])}\n\n{json.dumps({'sequence': [[float(t) for t in vec] for vec in v[4]], 'id': 'x'})}\n")
    (src / "d.jsonl").write_text(json.dumps({"sequence": [[1, 2, 3], [4, 5, 6]]}) + "\n")
    (src / "notes.txt").write_text("ignored")
    (src / "e.json").write_bytes(b"\xef\xbb\xbf" + _record(v[0]).encode())
    r = cv.convert([src], tmp_path / "out", workers=1, dim=3)
    assert (r.num_sequences, r.num_rejected, r.num_ignored_files) == (7, 0, 1)
    rows = _read_dataset(tmp_path / "out")
    got = {(Path(p).name, ln): a for p, ln, a in rows}
    assert got[("a.jsonl", 1)].tobytes() == _expected(v[0]).tobytes()
    assert got[("a.jsonl", 4)].tobytes() == _expected(v[1]).tobytes()
    assert got[("b.json", 1)].tobytes() == _expected(v[2]).tobytes()
    assert got[("c.json", 1)].tobytes() == _expected(v[3]).tobytes()
    assert got[("c.json", 3)].tobytes() == _expected(v[4]).tobytes()
    assert got[("d.jsonl", 1)].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert got[("e.json", 1)].tobytes() == _expected(v[0]).tobytes()


def test_dim_is_taken_from_first_valid_record(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('not json\n[[1]]\n[[1,2,3],[4,5,6]]\n[[1,2],[3,4]]\n')
    r = cv.convert([src], tmp_path / "out", on_error="skip", workers=1)
    assert r.index.dim == 3
    assert (r.num_sequences, r.num_rejected, r.num_records) == (1, 3, 4)


# ---------------------------------------------------------------------------------------------------------
# Fast path: object records, mixed blocks, many small files


def _object(vectors: list[list[str]], style: int, multiline: bool = False) -> str:
    """An object record {"sequence": ...} in one of several spellings (white space, key order, extra keys);
    `multiline` spreads it over lines (for a .json file)."""
    body = _record(vectors)
    nl = "\r\n" if multiline else " "
    return [
        '{"sequence":' + body + "}",
        '{ "sequence" : ' + body + " }",
        '\t{' + nl + '"sequence"' + nl + ':\t' + body.replace(", ", "," + nl) + nl + "}\t",
        '{"id": 7, "sequence": ' + body + ', "meta": {"name": "f", "tags": ["a", "b"], "x": [1.5, null]}}',
        '{"sequ\\u0065nce": ' + body + "}",
    ][style % 5]


def test_object_records_take_the_fast_path(tmp_path, backend):
    """A clean corpus of object records (every spelling, mixed with arrays in the same blocks and in many
    small .json files) is converted without the record-by-record path, with the exact values."""
    rng = np.random.default_rng(21)
    src = tmp_path / "src"
    (src / "fns").mkdir(parents=True)
    expected = {}
    lines = []
    for i in range(117):
        vecs = [_vec_text(rng) for _ in range(int(rng.integers(2, 40)))]
        lines.append(_object(vecs, i) if i % 3 else _record(vecs))
        expected[(str(src / "part.jsonl"), i + 1)] = vecs
    (src / "part.jsonl").write_text("\n".join(lines) + "\n")
    for i in range(53):
        vecs = [_vec_text(rng) for _ in range(int(rng.integers(2, 40)))]
        path = src / "fns" / f"fn-{i:03d}.json"
        path.write_text(_object(vecs, i, multiline=True) if i % 2 else _record(vecs) + "\n")
        expected[(str(path), 1)] = vecs
    r = cv.convert([src], tmp_path / "out", workers=1, dim=DIM)
    _check_matches(tmp_path / "out", expected)
    assert (r.num_records_fast, r.num_records_slow, r.num_rejected) == (117 + 53, 0, 0)


def test_negative_zero_integers_take_the_fast_path(tmp_path, backend):
    (tmp_path / "z.jsonl").write_text('[[-0, 1], [2, -0]]\n{"sequence": [[0,-0 ],[-0\t,-0.0]]}\n')
    r = cv.convert([tmp_path / "z.jsonl"], tmp_path / "out", workers=1)
    rows = _read_dataset(tmp_path / "out")
    assert rows[0][2].tobytes() == np.array([[-0.0, 1], [2, -0.0]], np.float32).tobytes()
    assert rows[1][2].tobytes() == np.array([[0.0, -0.0], [-0.0, -0.0]], np.float32).tobytes()
    assert (r.num_records_fast, r.num_records_slow) == (2, 0)


def test_block_of_objects_with_one_bad_record_keeps_every_good_one(tmp_path, backend):
    rng = np.random.default_rng(22)
    src = tmp_path / "mixed.jsonl"
    vectors = [[_vec_text(rng) for _ in range(int(rng.integers(2, 30)))] for _ in range(41)]
    lines = [_object(v, i % 4) if i % 2 else _record(v) for i, v in enumerate(vectors)]
    bad_line = 18
    reason = f"vector 1 (0-based) has {DIM - 1} values, expected {DIM} (--dim)"
    lines[bad_line - 1] = json.dumps({"sequence": [[1] * DIM, [1] * (DIM - 1)]})
    src.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as e:
        cv.convert([src], tmp_path / "fail", workers=1, dim=DIM)
    assert f"{src}:{bad_line}: {reason};" in str(e.value)

    r = cv.convert([src], tmp_path / "skip", workers=1, dim=DIM, on_error="skip")
    assert (r.num_sequences, r.num_rejected, r.num_records) == (40, 1, 41)
    assert r.num_records_slow == 41 and r.num_records_fast == 0  # only the block holding the bad record
    rows = _read_dataset(tmp_path / "skip")
    assert [ln for _, ln, _ in rows] == [i + 1 for i in range(41) if i + 1 != bad_line]
    for _, ln, arr in rows:
        assert arr.tobytes() == _expected(vectors[ln - 1]).tobytes()
    rejects = [json.loads(x) for x in (tmp_path / "skip" / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"path": str(src), "line": bad_line, "reason": reason}]


@pytest.mark.parametrize("record, reason", [
    ('{"sequence": [[1, 2], [3, "4"]], "id": 1}', "vector 1 value 1 (0-based) is a string, expected a number"),
    ('{"id": 1, "seq": [[1, 2], [3, 4]]}', 'object has no "sequence" key'),
    ('{"sequence": [[1, 2], [3, 4]]}}', "not valid JSON"),
    ('{"sequence": [[1, 2], [3, 4]], }', "not valid JSON"),
    ('{"sequence": {"a": [[1, 2], [3, 4]]}}', "expected an array of vectors, got an object"),
    ('{"sequence": [[1, 2]]}', "has 1 vector; at least 2 are needed"),
    ('{"sequence": [[1, 2], [3, 1e39]]}', "overflows float32"),
    ('{"sequence": [[1, 2], [3, 4]], "sequence": [[1, 2]]}', "has 1 vector"),  # the last key wins, as in json
])
def test_bad_object_records_keep_their_exact_reason(tmp_path, record, reason, backend):
    src = tmp_path / "o.jsonl"
    src.write_text('{"sequence": [[1, 2], [3, 4]], "id": 0}\n' + record + '\n{"sequence": [[5, 6], [7, 8]]}\n')
    r = cv.convert([src], tmp_path / "out", workers=1, dim=2, on_error="skip")
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["line"] == 2 and reason in rejects[0]["reason"]
    assert [arr.tolist() for _, _, arr in _read_dataset(tmp_path / "out")] == [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    assert r.num_sequences == 2


def test_lines_that_only_join_into_records_are_rejected(tmp_path, backend):
    """Two broken lines whose text, joined with a comma, would read as two valid records must not pass."""
    src = tmp_path / "glued.jsonl"
    src.write_text("[[1,2],[1,2]],[[3,4]\n[5,6]]\n[[7,8],[9,10]]\n")
    r = cv.convert([src], tmp_path / "out", workers=1, dim=2, on_error="skip")
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(x["line"], "not valid JSON" in x["reason"]) for x in rejects] == [(1, True), (2, True)]
    assert (r.num_sequences, r.num_rejected) == (1, 2)
    assert [ln for _, ln, _ in _read_dataset(tmp_path / "out")] == [3]


def test_many_small_json_files_in_one_block(tmp_path, backend):
    """Hundreds of small .json files are parsed together; odd files among them (blank, BOM, indented,
    JSON Lines, a bad one) keep their exact handling and every record its file and line."""
    rng = np.random.default_rng(23)
    src = tmp_path / "fns"
    src.mkdir()
    expected, bad, blank = {}, None, None
    for i in range(301):
        path = src / f"fn-{i:04d}.json"
        vecs = [_vec_text(rng, 5) for _ in range(int(rng.integers(2, 12)))]
        if i == 150:
            path.write_text("  \n")
            blank = path
            continue
        if i == 151:
            path.write_text('[[1, 2, 3, 4, 5], [1, 2, 3, "4", 5]]')
            bad = path
            continue
        if i == 152:  # JSON Lines in a .json file
            more = [_vec_text(rng, 5) for _ in range(3)]
            path.write_text(_record(vecs) + "\n" + _record(more) + "\n")
            expected[(str(path), 2)] = more
        elif i == 153:
            path.write_bytes(b"\xef\xbb\xbf" + _object(vecs, 0).encode())
        elif i == 154:
            path.write_text("\n  " + _record(vecs))
        else:
            path.write_text(_object(vecs, i) if i % 2 else _record(vecs))
        expected[(str(path), 1)] = vecs
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        r = cv.convert([src], out, workers=workers, on_error="skip", shard_mb=0.05)
        _check_matches(out, expected)
        rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
        assert rejects == [
            {"path": str(blank), "line": 1,
             "reason": "file holds only white space (3 bytes): nothing to convert \u2014 a failed export?"},
            {"path": str(bad), "line": 1, "reason": "vector 1 value 3 (0-based) is a string, expected a number"},
        ]
        assert r.num_records == len(expected) + 2
        # Only the blocks holding the odd files go file by file.
        assert 0 < r.num_records_slow < r.num_records // 4
        results[workers] = _shard_digests(out)
    assert results[1] == results[2]


# ---------------------------------------------------------------------------------------------------------
# Rejects

BAD_RECORDS = {
    "invalid": ("[[1,2],[3,4]", "not valid JSON"),
    "nan": ("[[1,2],[NaN,4]]", "NaN is not allowed"),
    "infinity": ("[[1,2],[-Infinity,4]]", "Infinity is not allowed"),
    "string": ('[[1,2],["3",4]]', "is a string"),
    "bool": ("[[1,2],[true,4]]", "is true"),
    "null": ("[[1,2],[null,4]]", "is null"),
    "ragged": ("[[1,2],[3,4,5]]", "has 3 values, expected 2"),
    "flat": ("[1,2,3,4]", "is a number, expected an array"),
    "not_array": ('"text"', "expected an array of vectors, got a string"),
    "no_sequence": ('{"seq": [[1,2],[3,4]]}', 'no "sequence" key'),
    "overflow": ("[[1,2],[3.5e38,4]]", "overflows float32"),
    "overflow_int": ("[[1,2],[1000000000000000000000000000000000000000,4]]", "overflows float32"),
    "short": ("[[1,2]]", "at least 2 are needed"),
    "empty": ("[]", "at least 2 are needed"),
    "nested": ("[[[1,2]],[[3,4]]]", "is an array, expected a number"),
    "not_utf8": (b"[[1,2],[3,4]]\xff".decode("latin-1"), "not valid UTF-8"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_each_rejection_class_in_both_modes(tmp_path, kind, backend):
    bad, reason = BAD_RECORDS[kind]
    good = "[[1,2],[3,4],[5,6]]"
    src = tmp_path / "in.jsonl"
    body = f"{good}\n{good}\n".encode() + (bad.encode("latin-1") if kind == "not_utf8" else bad.encode()) + f"\n{good}\n".encode()
    src.write_bytes(body)
    with pytest.raises(DataError) as e:
        cv.convert([src], tmp_path / "fail", workers=1, dim=2)
    msg = str(e.value)
    assert f"{src}:3:" in msg and reason in msg and "\n" not in msg
    assert not (tmp_path / "fail" / "index.json").exists()

    r = cv.convert([src], tmp_path / "skip", workers=1, dim=2, on_error="skip")
    assert (r.num_sequences, r.num_rejected, r.num_records) == (3, 1, 4)
    rejects = [json.loads(x) for x in (tmp_path / "skip" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["path"] == str(src) and rejects[0]["line"] == 3
    assert reason in rejects[0]["reason"]
    index = dataset.read_index(tmp_path / "skip")
    assert index.num_rejected == 1 and index.extra["num_records"] == 4
    assert [ln for _, ln, _ in _read_dataset(tmp_path / "skip")] == [1, 2, 4]


def test_truncated_single_json_document_is_one_reject(tmp_path):
    (tmp_path / "a.json").write_text('[\n  [1, 2],\n  [3, 4\n')
    (tmp_path / "b.json").write_text('[[1, 2], [3, 4]]')
    r = cv.convert([tmp_path], tmp_path.parent / "out_trunc", workers=1, on_error="skip")
    assert (r.num_sequences, r.num_rejected) == (1, 1)
    reject = json.loads((tmp_path.parent / "out_trunc" / "rejects.jsonl").read_text())
    assert reject["line"] == 1 and "not valid JSON" in reject["reason"]


@pytest.mark.parametrize("shard_mb, workers", [(64, 1), (0.01, 2)])
def test_json_file_with_a_bad_first_line_is_still_json_lines(tmp_path, shard_mb, workers):
    """A .json file that is not one JSON value but has lines that are records keeps every good line (each bad
    line is its own reject with its own line number), also when it is big enough to be split into groups."""
    rng = np.random.default_rng(23)
    lines = ["{bad"] + [_record([[f"{x:.4g}" for x in rng.random(3)] for _ in range(int(rng.integers(2, 6)))])
                        for _ in range(1001)]
    lines[500] = "[[1, 2, 3]]"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.json").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    r = cv.convert([tmp_path / "src"], out, workers=workers, on_error="skip", shard_mb=shard_mb)
    assert (r.num_records, r.num_sequences, r.num_rejected) == (1002, 1000, 2)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [x["line"] for x in rejects] == [1, 501]
    assert "not valid JSON" in rejects[0]["reason"] and "at least 2 are needed" in rejects[1]["reason"]
    assert [ln for _, ln, _ in _read_dataset(out)] == [i + 1 for i in range(1, 1002) if i != 500]
    with pytest.raises(DataError, match=r"a\.json:1: not valid JSON"):
        cv.convert([tmp_path / "src"], tmp_path / "out_fail", workers=workers, shard_mb=shard_mb)


@pytest.mark.parametrize("shard_mb", [64, 0.0001])
def test_broken_pretty_printed_document_stays_one_reject(tmp_path, shard_mb):
    """A truncated pretty-printed record has lines that are JSON on their own (a number, a vector), but none
    that is a record: it is one document and one reject at line 1, whether or not it is split into groups."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.json").write_text(json.dumps({"sequence": [[1, 2], [3, 4], [5, 6]]}, indent=2)[:-2])
    (tmp_path / "src" / "b.json").write_text(json.dumps([[1, 2], [3, 4]], indent=4)[:-1])
    (tmp_path / "src" / "c.json").write_text("[\n [1, 2],\n [3, 4]\n")
    (tmp_path / "src" / "d.json").write_text("[[1, 2], [3, 4]]")
    out = tmp_path / "out"
    r = cv.convert([tmp_path / "src"], out, workers=1, on_error="skip", shard_mb=shard_mb)
    assert (r.num_records, r.num_sequences, r.num_rejected) == (4, 1, 3)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(Path(x["path"]).name, x["line"]) for x in rejects] == [("a.json", 1), ("b.json", 1), ("c.json", 1)]


def test_lines_longer_than_a_read_chunk(tmp_path):
    """Line detection and record iteration read files in chunks; records spanning several chunks are whole."""
    from streamtrain.convert import sources

    rng = np.random.default_rng(29)
    big = [_record([[f"{x:.9g}" for x in rng.random(DIM)] for _ in range(n)]) for n in (5000, 3, 9000)]
    assert len(big[0]) > 1 << 20 and len(big[2]) > 2 << 20
    (tmp_path / "src").mkdir()
    lines_json = tmp_path / "src" / "lines.json"
    lines_json.write_bytes(b"\xef\xbb\xbf\n  \n" + "\n".join(big).encode() + b"\n\n")
    one_doc = tmp_path / "src" / "one.json"
    one_doc.write_text(big[2] + "\n \n")
    jsonl = tmp_path / "src" / "x.jsonl"
    jsonl.write_text("\n".join(big) + "\n")
    found, _ = cv.list_sources([tmp_path / "src"])
    by_name = {Path(src.path).name: src for src in found}
    assert sources.is_lines_document(by_name["lines.json"])
    assert not sources.is_lines_document(by_name["one.json"])
    assert list(sources.iter_record_texts(by_name["x.jsonl"])) == [(i + 1, t.encode()) for i, t in enumerate(big)]
    r = cv.convert([tmp_path / "src"], tmp_path / "out", workers=2, shard_mb=1)
    assert (r.num_sequences, r.num_rejected) == (7, 0)


def test_on_error_fail_names_the_first_bad_record_for_any_worker_count(tmp_path):
    """Bad records in two different groups: the error names the first one in input order, whichever task
    finishes first (the later file's group is bigger, so it is scheduled first)."""
    rng = np.random.default_rng(31)
    (tmp_path / "src").mkdir()
    for name, n, bad_line in (("a.jsonl", 41, 37), ("b.jsonl", 403, 3)):
        lines = [_record([[f"{x:.4g}" for x in rng.random(4)] for _ in range(5)]) for _ in range(n)]
        lines[bad_line - 1] = "[[1, 2, 3, 4], [5, 6]]"
        (tmp_path / "src" / name).write_text("\n".join(lines) + "\n")
    messages = set()
    for workers in (1, 2, 3):
        with pytest.raises(DataError) as e:
            cv.convert([tmp_path / "src"], tmp_path / f"out{workers}", workers=workers, shard_mb=0.02)
        messages.add(str(e.value))
    assert len(messages) == 1
    assert re.search(r"a\.jsonl:37: vector 1 \(0-based\) has 2 values", messages.pop())


def test_many_rejects_counts_reconcile_with_workers(tmp_path):
    rng = np.random.default_rng(5)
    lines = []
    for i in range(117):
        if i % 7 == 3:
            lines.append("[[1,2],[3]]")
        else:
            lines.append(_record([[f"{x:.4g}" for x in rng.random(2)] for _ in range(int(rng.integers(2, 9)))]))
    for f in range(3):
        (tmp_path / f"f{f}.jsonl").write_text("\n".join(lines) + "\n")
    r = cv.convert([tmp_path], tmp_path.parent / "out_many", workers=2, on_error="skip", shard_mb=0.002)
    assert r.num_records == 3 * 117 and r.num_sequences + r.num_rejected == r.num_records
    assert r.num_rejected == 3 * len([i for i in range(117) if i % 7 == 3])
    rejects = [json.loads(x) for x in (tmp_path.parent / "out_many" / "rejects.jsonl").read_text().splitlines()]
    assert [(Path(x["path"]).name, x["line"]) for x in rejects] == [
        (f"f{f}.jsonl", i + 1) for f in range(3) for i in range(117) if i % 7 == 3
    ]


# ---------------------------------------------------------------------------------------------------------
# Determinism, splitting, reuse


def _shard_digests(root) -> list[str]:
    return [s.sha256 for s in dataset.read_index(root).shards]


def test_same_bytes_for_any_worker_count_and_split(tmp_path, backend):
    expected = _write_corpus(tmp_path / "src", n_files=9, records_per_file=31, seed=7)
    results = {}
    for workers, shard_mb in ((1, 0.05), (2, 0.05), (1, 1.0), (2, 1.0)):
        out = tmp_path / f"out-{workers}-{shard_mb}"
        cv.convert([tmp_path / "src"], out, workers=workers, shard_mb=shard_mb)
        _check_matches(out, expected)
        index = dataset.read_index(out)
        results[(workers, shard_mb)] = (_shard_digests(out), index.mean.tobytes(), index.std.tobytes(),
                                        index.lengths().tobytes())
    assert results[(1, 0.05)] == results[(2, 0.05)]
    assert results[(1, 1.0)] == results[(2, 1.0)]  # one group: partial tasks + merge vs one task
    assert len(results[(1, 0.05)][0]) > 3


def test_big_jsonl_file_split_at_line_boundaries_keeps_line_numbers(tmp_path):
    rng = np.random.default_rng(9)
    vecs = [[_vec_text(rng, 4) for _ in range(int(rng.integers(2, 30)))] for _ in range(117)]
    text = "\n".join(_record(v) if i % 10 else "" for i, v in enumerate(vecs)) + "\n"
    (tmp_path / "big.jsonl").write_text(text)
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        r = cv.convert([tmp_path / "big.jsonl"], out, workers=workers, shard_mb=len(text) / 5 / 2**20)
        assert r.groups_built >= 5
        rows = _read_dataset(out)
        assert [ln for _, ln, _ in rows] == [i + 1 for i in range(117) if i % 10]
        for _, ln, arr in rows:
            assert arr.tobytes() == _expected(vecs[ln - 1]).tobytes()
    assert _shard_digests(tmp_path / "out1") == _shard_digests(tmp_path / "out2")


def test_rerun_reuses_everything_and_changes_rebuild_only_their_group(tmp_path):
    src = tmp_path / "src"
    expected = _write_corpus(src, n_files=12, records_per_file=23, seed=11)
    out = tmp_path / "out"
    first = cv.convert([src], out, workers=1, shard_mb=0.02)
    assert first.groups_built > 3 and first.groups_reused == 0
    again = cv.convert([src], out, workers=1, shard_mb=0.02)
    assert (again.groups_built, again.parsed_bytes) == (0, 0)
    assert dataset.verify_dataset(dataset.read_index(out)) == []
    # A touched single-record file (same size, new mtime) is its group's only change.
    single = next(src.rglob("single-*.json"))
    os.utime(single, ns=(single.stat().st_atime_ns, single.stat().st_mtime_ns + 10**9))
    touched = cv.convert([src], out, workers=1, shard_mb=0.02)
    assert touched.groups_built == 1 and 0 < touched.parsed_bytes < 0.02 * 2**20 * 2

    # Change one file (new content, new size): only it is parsed again (all of its groups: it is bigger than
    # a shard, so it was split into several).
    target = src / "part-04.jsonl"
    lines = target.read_text().splitlines()
    lines[5] = _record([["1"] * DIM, ["0"] * DIM, ["0.5"] * DIM])
    target.write_text("\n".join(lines) + "\n")
    expected[(os.path.normpath(str(target)), 6)] = [["1"] * DIM, ["0"] * DIM, ["0.5"] * DIM]
    changed = cv.convert([src], out, workers=1, shard_mb=0.02)
    assert changed.parsed_bytes == target.stat().st_size
    assert 1 < changed.groups_built < first.groups_built / 2
    _check_matches(out, expected)
    fresh = cv.convert([src], tmp_path / "fresh", workers=2, shard_mb=0.02, force=True)
    assert fresh.groups_built == first.groups_built
    a, b = dataset.read_index(out), dataset.read_index(tmp_path / "fresh")
    assert _shard_digests(out) == _shard_digests(tmp_path / "fresh")
    assert a.mean.tobytes() == b.mean.tobytes() and a.std.tobytes() == b.std.tobytes()
    assert a.lengths().tobytes() == b.lengths().tobytes()

    # A removed file drops its sequences; settings changes and --force rebuild everything.
    (src / "part-00.jsonl").unlink()
    removed = cv.convert([src], out, workers=1, shard_mb=0.02)
    assert removed.num_sequences == len(expected) - 23
    assert cv.convert([src], out, workers=1, shard_mb=0.03).groups_reused == 0
    assert cv.convert([src], out, workers=1, shard_mb=0.03, force=True).groups_reused == 0
    index = dataset.read_index(out)
    assert dataset.verify_dataset(index) == []
    # Only files the index names are left behind.
    names = {p.name for p in (out / "shards").iterdir()}
    assert names == {Path(s.file).name for s in index.shards}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("lengths", "sources"))) == sorted(
        [index.lengths_file, index.extra["convert"]["manifest"]])


def test_rewrite_with_same_size_and_restored_mtime_is_parsed_again(tmp_path):
    """cp -p / rsync -t: new content of the same size under the old mtime is not taken for the old file."""
    src = tmp_path / "src"
    src.mkdir()
    target = src / "a.jsonl"
    target.write_text("[[1, 2], [3, 4]]\n[[5, 6], [7, 8]]\n")
    (src / "b.jsonl").write_text("[[0, 0], [0, 1]]\n")
    out = tmp_path / "out"
    cv.convert([src], out, workers=1, shard_mb=0.00001)
    st = target.stat()
    # In place (same inode): only the ctime tells.
    with open(target, "r+") as f:
        f.write("[[9, 2], [3, 4]]\n[[5, 6], [7, 9]]\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    r = cv.convert([src], out, workers=1, shard_mb=0.00001)
    assert r.parsed_bytes == st.st_size and r.groups_reused >= 1
    assert [arr.tolist() for path, _, arr in _read_dataset(out) if path.endswith("a.jsonl")] == [
        [[9, 2], [3, 4]], [[5, 6], [7, 9]]]
    # A new file put in place by rename (a new inode), as cp -p into a temp name and mv would.
    st = target.stat()
    tmp = src / "a.jsonl.new"
    tmp.write_text("[[8, 2], [3, 4]]\n[[5, 6], [7, 8]]\n")
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, target)
    r = cv.convert([src], out, workers=1, shard_mb=0.00001)
    assert r.parsed_bytes == st.st_size and r.groups_reused >= 1
    assert next(arr.tolist() for path, _, arr in _read_dataset(out) if path.endswith("a.jsonl")) == [[8, 2], [3, 4]]
    assert cv.convert([src], out, workers=1, shard_mb=0.00001).groups_built == 0


@pytest.mark.parametrize("damage", [
    lambda obj: obj.update(format_version=2),
    lambda obj: obj.update(format_version="1"),
    lambda obj: obj["shards"][0].update(num_sequences="3"),
    lambda obj: obj.pop("mean"),
])
def test_unreadable_index_is_an_error_and_deletes_nothing(tmp_path, damage):
    src = tmp_path / "src"
    _write_corpus(src, n_files=4, records_per_file=9, seed=37)
    out = tmp_path / "out"
    cv.convert([src], out, workers=1, shard_mb=0.01)
    obj = json.loads((out / "index.json").read_text())
    damage(obj)
    (out / "index.json").write_text(json.dumps(obj))
    (out / ".staging-leftover").mkdir()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"index\.json is unreadable .*use --force to rebuild"):
        cv.convert([src], out, workers=1, shard_mb=0.01)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # --force rebuilds; only then are the old files (no longer named by any index) deleted.
    r = cv.convert([src], out, workers=1, shard_mb=0.01, force=True)
    index = dataset.read_index(out)
    assert dataset.verify_dataset(index) == [] and r.num_sequences == index.num_sequences == 4 * 9 - 9 + 1
    assert {p.name for p in (out / "shards").iterdir()} == {Path(s.file).name for s in index.shards}
    assert not (out / ".staging-leftover").exists()


def test_failed_run_leaves_previous_dataset_untouched(tmp_path):
    src = tmp_path / "src"
    _write_corpus(src, n_files=4, records_per_file=9, seed=13)
    out = tmp_path / "out"
    cv.convert([src], out, workers=1)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with open(src / "part-00.jsonl", "a") as f:
        f.write("[[1,2]\n")
    with pytest.raises(DataError, match=r"part-00\.jsonl:10: not valid JSON"):
        cv.convert([src], out, workers=2)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


# ---------------------------------------------------------------------------------------------------------
# Crash safety (a real process killed at the worst moments)

_RUN = "import sys; from streamtrain.convert import convert; convert([sys.argv[1]], sys.argv[2], workers=int(sys.argv[3]), shard_mb=0.02)"


def _convert_subprocess(src, out, workers, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", _RUN, str(src), str(out), str(workers)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("hook", [{"STREAMTRAIN_TEST_CRASH_AFTER_SHARDS": "2"}, {"STREAMTRAIN_TEST_CRASH_AT": "before-index"},
                                  {"STREAMTRAIN_TEST_CRASH_AT": "after-index"}])
def test_killed_conversion_keeps_old_dataset_and_rerun_completes(tmp_path, hook):
    src = tmp_path / "src"
    expected = _write_corpus(src, n_files=8, records_per_file=19, seed=17)
    out = tmp_path / "out"
    # No previous dataset: a crash before the commit leaves no index.json.
    p = _convert_subprocess(src, out, 2, hook)
    assert p.returncode == 86, p.stderr
    if hook.get("STREAMTRAIN_TEST_CRASH_AT") != "after-index":
        assert not (out / "index.json").exists()
    cv.convert([src], out, workers=1, shard_mb=0.02)
    _check_matches(out, expected)
    old_index = (out / "index.json").read_bytes()
    # With a previous dataset: change every file, crash, and the old dataset is still complete and valid.
    for f in src.rglob("*.json*"):
        f.write_text(f.read_text().replace("1", "0", 3))
    p = _convert_subprocess(src, out, 2, hook)
    assert p.returncode == 86, p.stderr
    index = dataset.read_index(out)
    assert dataset.verify_dataset(index) == []
    if hook.get("STREAMTRAIN_TEST_CRASH_AT") != "after-index":
        assert (out / "index.json").read_bytes() == old_index
        _check_matches(out, expected)
    r = cv.convert([src], out, workers=2, shard_mb=0.02)
    assert dataset.verify_dataset(dataset.read_index(out)) == []
    assert not [p for p in out.iterdir() if p.name.startswith(".staging-")]
    assert r.num_sequences == len(expected)


def test_sigkill_while_shards_are_staged_is_harmless(tmp_path):
    src = tmp_path / "src"
    expected = _write_corpus(src, n_files=6, records_per_file=15, seed=19)
    out = tmp_path / "out"
    cv.convert([src], out, workers=1)
    old = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # A forced rebuild (shard_mb differs) that sleeps once its first shard is staged; killed there with its
    # whole process group.
    env = dict(os.environ, STREAMTRAIN_TEST_PAUSE_AT="staging", STREAMTRAIN_TEST_PAUSE_S="60")
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(src), str(out), "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        staged = []
        deadline = time.monotonic() + 60
        while not staged and proc.poll() is None and time.monotonic() < deadline:
            staged = [p for d in out.glob(".staging-*") for p in d.glob("shard-*.arrow")]
            time.sleep(0.01)
        assert staged and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "no staged shard"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert all(p.exists() for p in staged)  # killed while the staging folder held a shard
    # The old dataset is exactly as it was (the new files are garbage that the next run deletes).
    assert dataset.verify_dataset(dataset.read_index(out)) == []
    assert all((out / rel).read_bytes() == data for rel, data in old.items())
    _check_matches(out, expected)
    r = cv.convert([src], out, workers=1, shard_mb=0.02)
    assert r.num_sequences == len(expected)
    _check_matches(out, expected)
    assert not list(out.glob(".staging-*"))
    assert dataset.verify_dataset(dataset.read_index(out)) == []


# ---------------------------------------------------------------------------------------------------------
# Folder and argument errors


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        cv.convert([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(UserError, match=r"no \.json or \.jsonl files .*1 other files ignored"):
        cv.convert([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("[[1,2],[3,4]]\n")
    with pytest.raises(UserError, match="--dim must be >= 1"):
        cv.convert([tmp_path / "src"], tmp_path / "out", dim=0)
    # An output folder inside a source folder is never read as input; a source inside the output is an error.
    cv.convert([tmp_path / "src"], tmp_path / "src" / "out")
    assert cv.convert([tmp_path / "src"], tmp_path / "src" / "out", force=True).num_files == 1
    with pytest.raises(UserError, match="inside the output folder"):
        cv.convert([tmp_path / "src" / "out" / "shards"], tmp_path / "src" / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty and is not a streamtrain dataset"):
        cv.convert([tmp_path / "src"], tmp_path / "busy")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jsonl").write_text("[[1]]\nnope\n")
    with pytest.raises(DataError, match="no valid record"):
        cv.convert([tmp_path / "bad"], tmp_path / "out2", on_error="skip")
    with pytest.raises(DataError, match="no valid records: 2 seen, 2 rejected"):
        cv.convert([tmp_path / "bad"], tmp_path / "out3", on_error="skip", dim=1)
