"""Property tests of convert's JSON reader (hypothesis): random bytes, random JSON values, and mutations of
valid record files (bit flips, truncation, inserted or deleted bytes, swapped lines).

For every input, with each parser backend: `parse_record` raises nothing but RecordError; convert
(--on-error skip) raises nothing but a one-line DataError when no record is valid; kept + rejected == records
seen; and what convert keeps and rejects is, record for record, what the precise path (`parse_record` on
each record's text, split as the README says) keeps and rejects, with the same values bit for bit and the
same reasons.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamtrain import convert as cv
from streamtrain import dataset
from streamtrain.convert.records import is_json, looks_like_json_lines
from streamtrain.errors import DataError

DIM = 3
BOM = b"\xef\xbb\xbf"
BACKENDS = ["orjson"] + (["simdjson"] if cv.parser_backend("auto").name == "simdjson" else [])
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def _backend(name: str):
    old = os.environ.get("STREAMTRAIN_JSON_BACKEND")
    os.environ["STREAMTRAIN_JSON_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["STREAMTRAIN_JSON_BACKEND"]
        else:
            os.environ["STREAMTRAIN_JSON_BACKEND"] = old


def _precise(data: bytes, suffix: str) -> list[tuple[int, np.ndarray | str]]:
    """(line, float32 values or the reason) of every record of a file, record by record with parse_record."""
    body = data.removeprefix(BOM)
    if not body.strip():
        return [(1, "blank")]
    if suffix == ".json" and (is_json(body) or not looks_like_json_lines(body)):
        texts = [(1, body)]
    else:
        lines = body.split(b"\n")
        texts = [(i + 1, t) for i, t in enumerate(lines) if t and not t.isspace()]
    out = []
    for line, text in texts:
        try:
            out.append((line, cv.parse_record(text, DIM)))
        except cv.RecordError as e:
            out.append((line, str(e)))
    return out


def _check_file(data: bytes, suffix: str) -> None:
    """The properties above, for one input file, with every backend."""
    expected = _precise(data, suffix)
    for backend in BACKENDS:
        with _backend(backend), tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / f"in{suffix}"
            src.write_bytes(data)
            kept_expected = [(ln, v) for ln, v in expected if not isinstance(v, str)]
            try:
                r = cv.convert([src], Path(tmp) / "out", workers=1, on_error="skip", dim=DIM)
            except DataError as e:
                assert not kept_expected, (backend, str(e))
                assert "\n" not in str(e) and str(e).startswith("no valid records")
                continue
            assert r.num_sequences + r.num_rejected == r.num_records == len(expected), backend
            index = dataset.read_index(r.out)
            kept = []
            for s in index.shards:
                table = dataset.open_shard(r.out / s.file)
                for seq, line in zip(table.column("sequence").to_pylist(), table.column("line").to_pylist()):
                    kept.append((line, np.asarray(seq, np.float32).reshape(-1, DIM)))
            assert [ln for ln, _ in kept] == [ln for ln, _ in kept_expected], backend
            for (ln, got), (_, want) in zip(kept, kept_expected):
                assert got.tobytes() == want.tobytes(), (backend, ln)
            rejects = []
            if r.rejects_path is not None:
                rejects = [(x["line"], x["reason"]) for x in map(json.loads, r.rejects_path.read_text().splitlines())]
            want_rejects = [(ln, v) for ln, v in expected if isinstance(v, str)]
            assert [ln for ln, _ in rejects] == [ln for ln, _ in want_rejects], backend
            for (ln, got), (_, want) in zip(rejects, want_rejects):
                assert (want == "blank" and "nothing to convert" in got) or got == want, (backend, ln, got, want)


def _parse_record_only_rejects(text: bytes) -> None:
    try:
        arr = cv.parse_record(text, None)
    except cv.RecordError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert arr.dtype == np.float32 and arr.ndim == 2 and len(arr) >= 2 and np.isfinite(arr).all()


# ---------------------------------------------------------------------------------------------------------
# Random bytes


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from([".json", ".jsonl"]))
def test_random_bytes(data, suffix):
    _parse_record_only_rejects(data)
    _check_file(data, suffix)


# ---------------------------------------------------------------------------------------------------------
# Random JSON values, some of them close to records

_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0, -0.0, 1, 3.4028235e38, 3.4028236e38, -3.5e38, 1e-46, 2**64, -(2**63)]),
)
_SCALARS = st.one_of(st.none(), st.booleans(), _NUMBERS, st.text(max_size=5))
_VALUES = st.recursive(_SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.sampled_from(["sequence", "id", "x"]), children, max_size=3)),
    max_leaves=20)
_VECTOR = st.lists(_NUMBERS, min_size=DIM, max_size=DIM) | st.lists(_NUMBERS, max_size=DIM + 1)
_RECORD = st.lists(_VECTOR, min_size=0, max_size=6)
_RECORDISH = st.one_of(_RECORD, st.builds(lambda r: {"sequence": r}, _RECORD), _VALUES)


def _dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN / Infinity too: they must be rejected


@SETTINGS
@given(st.lists(_RECORDISH, min_size=1, max_size=8), st.sampled_from([".json", ".jsonl"]),
       st.sampled_from([b"\n", b"\r\n", b"\n\n  \n"]))
def test_random_json_values(values, suffix, newline):
    texts = [_dumps(v) for v in values]
    for text in texts:
        _parse_record_only_rejects(text)
    _check_file(newline.join(texts) + b"\n", suffix)


# ---------------------------------------------------------------------------------------------------------
# Mutations of valid record files


_IN_RANGE = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False, width=32),
    st.integers(-5, 5),
    st.floats(-3.4e38, 3.4e38, allow_nan=False),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([3.4028234663852886e38, 3.4028235677973362e38, 1.401298464324817e-45, 7.006492321624085e-46,
                     -0.0, 0]),
)
# Finite numbers of every size: float32 range, beyond it (overflow), subnormal, integers beyond 64 bits.
_FINITE = st.one_of(
    _IN_RANGE,
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(min_value=-(2**130), max_value=2**130),
    st.sampled_from([3.4028234663852886e38, 3.4028235677973362e38, 3.4028235677973366e38, -3.4028235677973366e38,
                     1.401298464324817e-45, 7.006492321624085e-46, -0.0]),
)


@st.composite
def _shaped_file(draw) -> bytes:
    """Records of the right shape whose numbers may be anything finite (some beyond float32)."""
    # Files whose numbers all fit in float32 take the fast path; the others test where it must give way.
    numbers = draw(st.sampled_from([_IN_RANGE, _FINITE]))
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.integers(2, 4))
        rows = [draw(st.lists(numbers, min_size=DIM, max_size=DIM)) for _ in range(n)]
        # An integer zero is sometimes spelled "-0" (which must become -0.0, as float("-0") does).
        text = "[" + ",".join("[" + ",".join("-0" if v == 0 and type(v) is int and draw(st.booleans()) else json.dumps(v)
                                             for v in row) + "]" for row in rows) + "]"
        lines.append(('{"sequence": ' + text + "}" if draw(st.booleans()) else text).encode())
    return b"\n".join(lines) + b"\n"


@SETTINGS
@given(_shaped_file(), st.sampled_from([".json", ".jsonl"]))
def test_records_with_numbers_of_every_size(data, suffix):
    _check_file(data, suffix)


@st.composite
def _valid_file(draw) -> bytes:
    num_records = draw(st.integers(1, 6))
    lines = []
    for _ in range(num_records):
        n = draw(st.integers(2, 5))
        values = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32) | st.integers(-5, 5),
                               min_size=n * DIM, max_size=n * DIM))
        rows = [values[i * DIM:(i + 1) * DIM] for i in range(n)]
        lines.append(_dumps({"sequence": rows} if draw(st.booleans()) else rows))
    return b"\n".join(lines) + b"\n"


@st.composite
def _mutated_file(draw) -> bytes:
    data = bytearray(draw(_valid_file()))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "swap"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=4) | st.sampled_from([b",", b"]", b"[", b"\n", b"-0", b"e9"]))
        elif kind == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 4))]
        elif kind == "swap":
            lines = bytes(data).split(b"\n")
            if len(lines) > 2:
                i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
            data = bytearray(b"\n".join(lines))
    return bytes(data)


@SETTINGS
@given(_valid_file(), st.sampled_from([".json", ".jsonl"]))
def test_valid_files_keep_every_record(data, suffix):
    _check_file(data, suffix)
    assert all(not isinstance(v, str) for _, v in _precise(data, ".jsonl"))  # the generator makes valid ones


@SETTINGS
@given(_mutated_file(), st.sampled_from([".json", ".jsonl"]))
def test_mutated_files(data, suffix):
    for line in data.split(b"\n"):
        _parse_record_only_rejects(line)
    _check_file(data, suffix)


def test_precise_reference_sees_bad_values():
    """The reference itself rejects what it must (so the properties above compare against something)."""
    assert isinstance(_precise(b"[[1, 2, 3], [NaN, 2, 3]]\n", ".jsonl")[0][1], str)
    assert isinstance(_precise(b"[[1, 2, 3], [1e39, 2, 3]]\n", ".jsonl")[0][1], str)
    assert _precise(b"", ".json") == [(1, "blank")]
    got = _precise(b"[[1, 2, 3], [4, 5, 6]]\n", ".json")
    assert got[0][0] == 1 and got[0][1].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert math.isfinite(float(np.float32(3.4028235e38)))
