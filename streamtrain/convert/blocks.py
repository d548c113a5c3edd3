"""Blocks of records: the fast path of convert, and the JSON parser backends it uses.

A block of records (about 1 MB: lines of a .jsonl file, or many small .json files together) is wrapped into
one JSON array and parsed in one call (simdjson's `as_buffer` when available, else orjson + numpy). An
object record `{"sequence": VALUE}` enters the block as the text of VALUE (cut out textually; an object with
other keys as well is decoded and its value written back as JSON). Each record's structure is checked on its
own text's "skeleton" (the text with number characters and white space deleted: a valid record reads
`[[,,],[,,]]`), so a line that is only part of a record, or two, cannot pass. Only a block that fails is
re-read record by record (`records.parse_record`) to give each bad record its exact reason; `ConvertResult`
counts the records of each path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from itertools import chain
from typing import Sequence

import numpy as np
import orjson

from streamtrain.convert.records import (
    BOM,
    F32_OVERFLOW,
    NEGATIVE_ZERO_INT,
    RecordError,
    blank_file_reason,
    decode_json,
    is_blank,
    is_json,
    looks_like_json_lines,
    parse_record,
    split_lines,
)
from streamtrain.errors import UserError

__all__ = [
    "parser_backend", "BLOCK_BYTES", "Backend", "BlockOut", "convert_fast", "document_records", "records_into",
    "reject_blank_file",
]

# Everything a JSON number or JSON white space can contain; deleting it leaves the structural skeleton.
_NUMBER_AND_SPACE = b"0123456789+-.eE \t\r\n"
BLOCK_BYTES = 1 << 20  # records parsed per call; big enough to amortise calls, small enough for the cache


# ---------------------------------------------------------------------------------------------------------
# Parser backends


class Backend:
    """Parses a JSON array of records into one flat float64 array of all its numbers (or None on any error)."""

    name = "orjson"

    def values(self, joined: bytes) -> np.ndarray | None:
        try:
            records = orjson.loads(joined)
            flat = list(chain.from_iterable(records))
            return np.array(flat, dtype=np.float64).reshape(-1)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None


class _SimdjsonBackend(Backend):
    name = "simdjson"

    def __init__(self, simdjson_module) -> None:
        self._mod = simdjson_module
        self._parser = simdjson_module.Parser()

    def values(self, joined: bytes) -> np.ndarray | None:
        try:
            doc = self._parser.parse(joined)
        except (ValueError, RuntimeError, UnicodeDecodeError, TypeError):
            return None
        try:
            # A flat buffer of every number without creating Python objects; fails on strings, bools, null.
            buf = doc.as_buffer(of_type="d") if isinstance(doc, self._mod.Array) else None
        except (TypeError, ValueError, RuntimeError):
            buf = None
        finally:
            del doc  # the parser can only be reused once no document proxy is alive
        return None if buf is None else np.frombuffer(buf, dtype=np.float64)


_BACKENDS: dict[tuple[int, str], Backend] = {}


def parser_backend(name: str | None = None) -> Backend:
    """The block parser for this process: "simdjson" (pysimdjson, fastest) when installed, else "orjson".
    STREAMTRAIN_JSON_BACKEND=orjson forces the fallback (tests compare both)."""
    name = name or os.environ.get("STREAMTRAIN_JSON_BACKEND") or "auto"
    key = (os.getpid(), name)
    if key not in _BACKENDS:
        backend: Backend = Backend()
        if name in ("auto", "simdjson"):
            try:
                import simdjson  # type: ignore[import-not-found]

                backend = _SimdjsonBackend(simdjson)
            except ImportError:
                if name == "simdjson":
                    raise UserError("STREAMTRAIN_JSON_BACKEND=simdjson but pysimdjson is not installed") from None
        _BACKENDS[key] = backend
    return _BACKENDS[key]


# ---------------------------------------------------------------------------------------------------------
# Blocks: skeleton checks, one parse per block, the precise path for a block that fails


_VECTOR_RUNS: dict[int, bytes] = {}  # dim -> "[,,],[,,],...": vector skeletons for the longest record yet
# `{"sequence":` at the start of a record, in any JSON white space (the key spelled without escapes).
_OBJECT_HEAD = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"sequence"[ \t\r\n]*:')
_JSON_SPACE = b" \t\r\n"


def _vector_run(num_vectors: int, dim: int) -> bytes:
    """At least `num_vectors` vector skeletons of `dim` numbers, each followed by ","."""
    run = _VECTOR_RUNS.get(dim, b"")
    if len(run) < num_vectors * (dim + 2):
        run = (b"[" + b"," * (dim - 1) + b"],") * max(num_vectors, 2 * len(run) // (dim + 2), 1024)
        if len(run) <= BLOCK_BYTES:  # kept for the next records unless one record was huge
            _VECTOR_RUNS[dim] = run
    return run


def _vector_counts(texts: Sequence[bytes], dim: int) -> np.ndarray | None:
    """Vectors per record if every text of `texts` is, on its own, one array of arrays of exactly `dim`
    numbers (as far as its skeleton shows: the numbers themselves are checked by the parser); else None.

    Each text is checked on its own, so a text that is half a record, or two, cannot pass even when the
    block of all texts would parse. A valid skeleton's length gives its vector count n; it must then read
    "[" + n vector skeletons joined by "," + "]"."""
    counts = np.empty(len(texts), dtype=np.int64)
    vector_bytes = dim + 2  # "[" + dim-1 commas + "]" + the comma before the next vector
    for i, text in enumerate(texts):
        skeleton = text.translate(None, _NUMBER_AND_SPACE)
        num_vectors, rest = divmod(len(skeleton) - 1, vector_bytes)
        if (
            rest or num_vectors < 1 or skeleton[0] != 0x5B or skeleton[-1] != 0x5D  # "[" and "]"
            or not _vector_run(num_vectors, dim).startswith(memoryview(skeleton)[1:-1])
        ):
            return None
        counts[i] = num_vectors
    return counts


def _array_texts(texts: Sequence[bytes]) -> list[bytes] | None:
    """Each record as the JSON text of its array of vectors: an array record as it is, an object record as
    the text of its "sequence" value. None when a record needs the precise path (an object without a
    "sequence" key, or one that is not valid JSON).

    `{"sequence": VALUE}` is unwrapped textually: when VALUE then passes the block checks, the record is a
    valid JSON object whose only key is "sequence", so this is exactly what the precise path would decode.
    Any other object (more keys, an escaped key) is decoded and its "sequence" value written back as JSON
    (orjson writes floats in shortest round-trip form, so parsing that text again gives the same float64)."""
    arrays = list(texts)
    for i, text in enumerate(texts):
        first = text[:1]
        if first == b"[":
            continue
        if first in b" \t\r\n":
            first = text.lstrip(_JSON_SPACE)[:1]
        if first != b"{":
            continue  # not a record: the block checks fail and the precise path gives the reason
        head = _OBJECT_HEAD.match(text)
        if head is not None:
            end = len(text) if text[-1:] == b"}" else len(text.rstrip(_JSON_SPACE))
            if text[end - 1:end] == b"}" and b'"' not in text[head.end():end]:
                arrays[i] = text[head.end():end - 1]
                continue
        try:
            value = decode_json(text)
        except RecordError:
            return None
        if not isinstance(value, dict) or "sequence" not in value:
            return None
        try:
            arrays[i] = orjson.dumps(value["sequence"])
        except orjson.JSONEncodeError:  # an integer beyond 64 bits: the precise path says what to do
            return None
    return arrays


@dataclass
class BlockOut:
    values: list = field(default_factory=list)  # float32 (n, dim) arrays
    lengths: list = field(default_factory=list)  # int64 arrays
    lines: list = field(default_factory=list)  # int64 arrays
    rejects: list = field(default_factory=list)  # (line, reason)
    num_records: int = 0
    num_fast: int = 0  # records that took the fast path


def _convert_slow(texts: Sequence[bytes], lines: Sequence[int], dim: int, out: BlockOut, on_error: str) -> bool:
    """Record by record, with reasons. Returns False when on_error == "fail" and a record was rejected."""
    for text, line in zip(texts, lines):
        out.num_records += 1
        try:
            arr = parse_record(text, dim)
        except RecordError as e:
            out.rejects.append((int(line), str(e)))
            if on_error == "fail":
                return False
            continue
        out.values.append(arr)
        out.lengths.append(np.array([len(arr)], dtype=np.int64))
        out.lines.append(np.array([line], dtype=np.int64))
    return True


def convert_fast(texts: Sequence[bytes], lines: Sequence[int], dim: int, out: BlockOut, backend: Backend) -> bool:
    """All of `texts` through the fast path into `out`; False (and `out` untouched) when any record needs the
    precise path: a parse error, a non-number, a wrong shape, a value beyond float32, or fewer than 2 vectors."""
    n = len(texts)
    arrays = _array_texts(texts)
    if arrays is None:
        return False
    counts = _vector_counts(arrays, dim)
    if counts is None or counts.min() < 2:
        return False
    joined = b"[" + b",".join(arrays) + b"]"
    del arrays
    if b"-0" in joined:
        # An integer "-0" is -0.0 (float("-0")), but JSON parsers read it as the integer 0.
        joined = NEGATIVE_ZERO_INT.sub(b"-0.0", joined)
    values = backend.values(joined)
    if values is None or len(values) != int(counts.sum()) * dim:
        return False
    # max/min make no temporaries; only a block that has a bad value pays for locating it.
    if not (values.max() < F32_OVERFLOW and values.min() > -F32_OVERFLOW):
        return False
    out.num_records += n
    out.num_fast += n
    out.values.append(values.reshape(-1, dim).astype(np.float32))
    out.lengths.append(counts)
    out.lines.append(np.asarray(lines, dtype=np.int64))
    return True


def _convert_block(
    texts: Sequence[bytes], lines: Sequence[int], dim: int, out: BlockOut, on_error: str, backend: Backend
) -> bool:
    """Convert records `texts` (their 1-based `lines`) into `out`; False when on_error == "fail" hit a reject."""
    if not texts or convert_fast(texts, lines, dim, out, backend):
        return True
    return _convert_slow(texts, lines, dim, out, on_error)


# ---------------------------------------------------------------------------------------------------------
# Files of records


def document_records(data: bytes, dim: int, out: BlockOut, on_error: str, backend: Backend) -> bool:
    """A .json file (all of its bytes): one record (line 1), or JSON Lines when the whole text is not one JSON
    value; a file of nothing but white space is one reject at line 1."""
    if is_blank(data):
        return reject_blank_file(len(data), data.startswith(BOM), out, on_error)
    if data.startswith(BOM):
        data = data[len(BOM):]
    if convert_fast([data], [1], dim, out, backend):
        return True
    if is_json(data) or not looks_like_json_lines(data):
        return _convert_slow([data], [1], dim, out, on_error)
    # JSON Lines: every line is its own record with its own reason and line number.
    texts, lines, _ = split_lines(data, 1)
    return records_into(texts, lines, dim, out, on_error, backend)


def reject_blank_file(size: int, bom: bool, out: BlockOut, on_error: str) -> bool:
    """Record a whole file that holds no record as one reject at line 1; False when on_error == "fail"."""
    out.num_records += 1
    out.rejects.append((1, blank_file_reason(size, bom)))
    return on_error != "fail"


def records_into(texts: list, lines: list, dim: int, out: BlockOut, on_error: str, backend: Backend) -> bool:
    """Records in blocks of about BLOCK_BYTES; False when on_error == "fail" hit a reject."""
    start, size = 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= BLOCK_BYTES:
            if not _convert_block(texts[start:i + 1], lines[start:i + 1], dim, out, on_error, backend):
                return False
            start, size = i + 1, 0
    return _convert_block(texts[start:], lines[start:], dim, out, on_error, backend)
