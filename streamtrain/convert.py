"""JSON/JSONL files → validated, checksummed Arrow shard dataset (the `streamtrain convert` engine).

Owns: finding input files, splitting records, validating them (with one precise reason per rejected record),
parsing values to float32, parallel conversion, per-dimension statistics, rejects, incremental reuse and the
crash-safe commit of a dataset folder. Imports format, numpy, pyarrow, orjson (and pysimdjson when installed);
never torch.

Records. A `.jsonl` file holds one record per line; a `.json` file (or any explicitly named file) holds one
record, or JSON Lines when the whole document is not one JSON value. A record is an array of vectors
`[[v1..vD], ...]` or an object with a `"sequence"` key holding one. Values are stored as
`np.float32(float(text))`: parsed to the nearest float64, then rounded to float32.

Work units. Input files, in sorted path order, are grouped into *groups* of about `shard_bytes` of input text
(a file larger than that is split into several groups at line boundaries); each group becomes one shard and is
the unit of reuse. Group boundaries depend only on file sizes and paths (plus a content-defined cut rule on
the path hash, so that adding a file disturbs only its neighbours), never on `workers`. Each group is cut into
*partials* of about `shard_bytes / 16` at line boundaries; statistics are computed per partial and merged in
order, so the result is bit-identical whether a group is converted by one task or partial by partial in
parallel (used when there are fewer than two groups per worker; each task writes its rows as a piece file
in the staging folder) and then merged into the same shard.

Fast path. A block of records (about 1 MB: lines of a .jsonl file, or many small .json files together) is
wrapped into one JSON array and parsed in one call (simdjson's `as_buffer` when available, else orjson +
numpy). An object record `{"sequence": VALUE}` enters the block as the text of VALUE (cut out textually; an
object with other keys as well is decoded and its value written back as JSON). Each record's structure is
checked on its own text's "skeleton" (the text with number characters and white space deleted: a valid
record reads `[[,,],[,,]]`), so a line that is only part of a record, or two, cannot pass. Only a block that
fails is re-read record by record to give each bad record its exact reason; `ConvertResult` counts the
records of each path.

Commit protocol (an earlier complete dataset in DIR stays usable at every instant):
  1. take `DIR/.convert.lock` (flock): one writer at a time; delete leftovers of a crashed run
     (`DIR/.staging-*`, files that the current index.json does not name);
  2. write every new shard into `DIR/.staging-<token>/` (temp name + fsync + rename);
  3. move the new shards into `DIR/shards/` under names that contain the run's random token, so no file
     the current index names is ever overwritten; fsync the folder;
  4. write `lengths-<token>.npy`, the reuse manifest `sources-<token>.json` and `rejects.jsonl` atomically;
  5. write `index.json` atomically (temp + fsync + rename): the single commit point;
  6. delete what the new index no longer names (old shards, old lengths/manifest, the staging folder).
A crash before 5 leaves the old index.json and every file it names untouched (new files are garbage that the
next run deletes); a crash after 5 leaves the new dataset complete. `rejects.jsonl` is a report, not dataset
content: between 4 and 5 it may already describe the new run. On a validation failure (`--on-error fail`)
the staging folder is deleted and DIR is left as it was.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import re
import secrets
import shutil
import sys
import time
import zlib
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import orjson

from streamtrain import format as fmt
from streamtrain.errors import DataError, UserError

__all__ = [
    "ON_ERROR_CHOICES",
    "F32_MAX",
    "RecordError",
    "parse_record",
    "ConvertProgress",
    "ConvertResult",
    "convert",
    "default_workers",
    "list_sources",
    "parser_backend",
]

ON_ERROR_CHOICES = ("fail", "skip")
F32_MAX = float(np.finfo(np.float32).max)
MANIFEST_FORMAT = "streamtrain-convert-manifest"
MANIFEST_VERSION = 1
LOCK_FILE = ".convert.lock"
STAGING_PREFIX = ".staging-"

_BOM = b"\xef\xbb\xbf"
_INPUT_SUFFIXES = (".json", ".jsonl")
# Everything a JSON number or JSON white space can contain; deleting it leaves the structural skeleton.
_NUMBER_AND_SPACE = b"0123456789+-.eE \t\r\n"
_BLOCK_BYTES = 1 << 20  # records parsed per call; big enough to amortise calls, small enough for the cache
_MIN_PARTIAL_BYTES = 256 << 10
_CDC_MASK = 7  # a file whose path hash has these bits clear may end a group early (content-defined cut)
_READ_BYTES = 8 << 20


# ---------------------------------------------------------------------------------------------------------
# One record: precise validation with a reason (the slow path, and the contract the fast path must match)


class RecordError(ValueError):
    """A record that cannot be converted; str(e) is the reason shown to the user."""


class _NonFinite(Exception):
    pass


def _raise_nonfinite(name: str):
    raise _NonFinite(name)


def _kind_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a number"


# An integer "-0" must become -0.0 (float("-0") is -0.0), but JSON parsers read it as the integer 0.
_NEGATIVE_ZERO_INT = re.compile(rb"-0(?![0-9.eE])")


def _parse_int(text: str):
    return -0.0 if text == "-0" else int(text)


def _decode_json(text: bytes):
    """Python value of `text`, or RecordError with the reason it is not a usable JSON value."""
    if b"-0" in text and _NEGATIVE_ZERO_INT.search(text):
        try:
            return json.loads(text, parse_constant=_raise_nonfinite, parse_int=_parse_int)
        except (ValueError, RecursionError, _NonFinite):
            pass  # diagnosed below
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        orjson_reason = str(e)
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"not valid UTF-8 (byte 0x{text[e.start]:02x} at offset {e.start})") from None
    try:
        # The stdlib parser accepts integers wider than 64 bits (orjson does not) and names NaN/Infinity.
        return json.loads(text, parse_constant=_raise_nonfinite)
    except _NonFinite as e:
        raise RecordError(
            f"{e.args[0]} is not allowed (JSON has no NaN or Infinity, and the value must be a finite float32)"
        ) from None
    except (ValueError, RecursionError):
        pass
    if not text.strip():
        raise RecordError("empty record")
    raise RecordError(f"not valid JSON ({orjson_reason})")


def _validate_value(seq, dim: int | None) -> np.ndarray:
    """float32 (T, D) array of a decoded record, or RecordError. dim=None accepts any consistent width."""
    if isinstance(seq, dict):
        if "sequence" not in seq:
            raise RecordError('object has no "sequence" key (expected {"sequence": [[v1, ...], ...]})')
        seq = seq["sequence"]
    if not isinstance(seq, list):
        raise RecordError(f"expected an array of vectors, got {_kind_of(seq)}")
    width = dim
    for i, vec in enumerate(seq):
        if not isinstance(vec, list):
            raise RecordError(f"vector {i} (0-based) is {_kind_of(vec)}, expected an array of numbers")
        for j, v in enumerate(vec):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RecordError(f"vector {i} value {j} (0-based) is {_kind_of(v)}, expected a number")
            f = float(v) if not isinstance(v, int) or abs(v) < 2**1000 else math.inf
            if not math.isfinite(f) or abs(f) > F32_MAX:
                raise RecordError(
                    f"vector {i} value {j} (0-based) = {v!r} overflows float32 (|x| > {F32_MAX:.8g})"
                )
        if width is None:
            width = len(vec)
            if width == 0:
                raise RecordError(f"vector {i} (0-based) is empty")
        if len(vec) != width:
            expected = f"expected {width} (--dim)" if dim is not None else f"vector 0 has {width}"
            raise RecordError(f"vector {i} (0-based) has {len(vec)} values, {expected}")
    if len(seq) < 2:
        raise RecordError(
            f"has {len(seq)} vector{'s' if len(seq) != 1 else ''}; at least 2 are needed (the model predicts the next one)"
        )
    return np.asarray(seq, dtype=np.float64).astype(np.float32)


def parse_record(text: bytes | str, dim: int | None = None) -> np.ndarray:
    """Validate one record and return it as float32 (T, dim); raise RecordError with the reason otherwise."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    return _validate_value(_decode_json(text), dim)


# ---------------------------------------------------------------------------------------------------------
# Blocks of records: the fast path


class _Backend:
    """Parses a JSON array of records into one flat float64 array of all its numbers (or None on any error)."""

    name = "orjson"

    def values(self, joined: bytes) -> np.ndarray | None:
        try:
            records = orjson.loads(joined)
            flat = list(chain.from_iterable(records))
            return np.array(flat, dtype=np.float64).reshape(-1)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None


class _SimdjsonBackend(_Backend):
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


_BACKENDS: dict[tuple[int, str], _Backend] = {}


def parser_backend(name: str | None = None) -> _Backend:
    """The block parser for this process: "simdjson" (pysimdjson, fastest) when installed, else "orjson".
    STREAMTRAIN_JSON_BACKEND=orjson forces the fallback (tests compare both)."""
    name = name or os.environ.get("STREAMTRAIN_JSON_BACKEND") or "auto"
    key = (os.getpid(), name)
    if key not in _BACKENDS:
        backend: _Backend = _Backend()
        if name in ("auto", "simdjson"):
            try:
                import simdjson  # type: ignore[import-not-found]

                backend = _SimdjsonBackend(simdjson)
            except ImportError:
                if name == "simdjson":
                    raise UserError("STREAMTRAIN_JSON_BACKEND=simdjson but pysimdjson is not installed") from None
        _BACKENDS[key] = backend
    return _BACKENDS[key]


_VECTOR_RUNS: dict[int, bytes] = {}  # dim -> "[,,],[,,],...": vector skeletons for the longest record yet
# `{"sequence":` at the start of a record, in any JSON white space (the key spelled without escapes).
_OBJECT_HEAD = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"sequence"[ \t\r\n]*:')
_JSON_SPACE = b" \t\r\n"


def _vector_run(num_vectors: int, dim: int) -> bytes:
    """At least `num_vectors` vector skeletons of `dim` numbers, each followed by ","."""
    run = _VECTOR_RUNS.get(dim, b"")
    if len(run) < num_vectors * (dim + 2):
        run = (b"[" + b"," * (dim - 1) + b"],") * max(num_vectors, 2 * len(run) // (dim + 2), 1024)
        if len(run) <= _BLOCK_BYTES:  # kept for the next records unless one record was huge
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
            value = _decode_json(text)
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
class _BlockOut:
    values: list = field(default_factory=list)  # float32 (n, dim) arrays
    lengths: list = field(default_factory=list)  # int64 arrays
    lines: list = field(default_factory=list)  # int64 arrays
    rejects: list = field(default_factory=list)  # (line, reason)
    num_records: int = 0
    num_fast: int = 0  # records that took the fast path


def _convert_slow(texts: Sequence[bytes], lines: Sequence[int], dim: int, out: _BlockOut, on_error: str) -> bool:
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


def _convert_fast(texts: Sequence[bytes], lines: Sequence[int], dim: int, out: _BlockOut, backend: _Backend) -> bool:
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
        joined = _NEGATIVE_ZERO_INT.sub(b"-0.0", joined)
    values = backend.values(joined)
    if values is None or len(values) != int(counts.sum()) * dim:
        return False
    # max/min make no temporaries; only a block that has a bad value pays for locating it.
    if not (values.max() <= F32_MAX and values.min() >= -F32_MAX):
        return False
    out.num_records += n
    out.num_fast += n
    out.values.append(values.reshape(-1, dim).astype(np.float32))
    out.lengths.append(counts)
    out.lines.append(np.asarray(lines, dtype=np.int64))
    return True


def _convert_block(
    texts: Sequence[bytes], lines: Sequence[int], dim: int, out: _BlockOut, on_error: str, backend: _Backend
) -> bool:
    """Convert records `texts` (their 1-based `lines`) into `out`; False when on_error == "fail" hit a reject."""
    if not texts or _convert_fast(texts, lines, dim, out, backend):
        return True
    return _convert_slow(texts, lines, dim, out, on_error)


# ---------------------------------------------------------------------------------------------------------
# Splitting files into records


def _split_lines(data: bytes, first_line: int, bom: bool = False, starts: bool = False):
    """Non-blank lines of `data`, their 1-based line numbers, and (if `starts`) the byte offset of every
    line start in `data`, blank or not. `bom`: `data` begins a file, so a UTF-8 byte-order mark is dropped."""
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    offsets = None
    if starts:
        offsets = np.zeros(len(raw) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, raw), dtype=np.int64, count=len(raw)) + 1, out=offsets[1:])
    if bom and raw and raw[0].startswith(_BOM):
        raw[0] = raw[0][len(_BOM):]
    texts, lines = [], []
    for i, text in enumerate(raw):
        if text and not text.isspace():
            texts.append(text)
            lines.append(first_line + i)
    return texts, lines, offsets


def _first_record_line(data: bytes) -> bytes | None:
    for text in data.split(b"\n", 64):
        if text and not text.isspace():
            return text
    return None


def _looks_like_json_lines(data: bytes) -> bool:
    """A document that is not one JSON value is JSON Lines when its first non-blank line is one on its own."""
    first = _first_record_line(data)
    if first is None:
        return False
    try:
        _decode_json(first)
    except RecordError:
        return False
    return True


def _document_records(data: bytes, dim: int, out: _BlockOut, on_error: str, backend: _Backend) -> bool:
    """A .json file: one record (line 1), or JSON Lines when the whole text is not one JSON value."""
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    if not data.strip():
        return True
    if _convert_fast([data], [1], dim, out, backend):
        return True
    try:
        _decode_json(data)
        whole_is_json = True
    except RecordError:
        whole_is_json = False
    if whole_is_json or not _looks_like_json_lines(data):
        return _convert_slow([data], [1], dim, out, on_error)
    texts, lines, _ = _split_lines(data, 1)
    return _records_into(texts, lines, dim, out, on_error, backend)


def _documents_into(docs: list, dim: int, st: _TaskState, on_error: str, backend: _Backend) -> bool:
    """Whole .json files [(path, text)], each one record at line 1 in the common case, converted as one block
    (so many small files cost one parse); when the block fails, file by file as `_document_records` does."""
    texts = []
    for _, data in docs:
        data = data.removeprefix(_BOM)
        if data[:1] not in (b"[", b"{"):
            break  # blank, indented or not a record: take the file-by-file path
        texts.append(data)
    else:
        out = _BlockOut()
        if _convert_fast(texts, [1] * len(texts), dim, out, backend):
            st.add([path for path, _ in docs], out)
            return True
    for path, data in docs:
        out = _BlockOut()
        ok = _document_records(data, dim, out, on_error, backend)
        st.add(path, out)
        if not ok:
            return False
    return True


def _records_into(texts: list, lines: list, dim: int, out: _BlockOut, on_error: str, backend: _Backend) -> bool:
    """Records in blocks of about _BLOCK_BYTES; False when on_error == "fail" hit a reject."""
    start, size = 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= _BLOCK_BYTES:
            if not _convert_block(texts[start:i + 1], lines[start:i + 1], dim, out, on_error, backend):
                return False
            start, size = i + 1, 0
    return _convert_block(texts[start:], lines[start:], dim, out, on_error, backend)


def _read_range(path: str, start: int, end: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, end - start, start)
        if len(data) < end - start:  # a short read (large ranges); read the rest, up to end of file
            parts = [data]
            pos = start + len(data)
            while pos < end and (more := os.pread(fd, end - pos, pos)):
                parts.append(more)
                pos += len(more)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# Statistics per partial (deterministic: a fixed chunking of the partial's values)

_STATS_ROWS = 8192


def _values_stats(blocks: list, dim: int) -> fmt.RunningStats:
    """Statistics of the rows of `blocks` (float32 (n, dim) arrays, in order), computed over fixed chunks of
    _STATS_ROWS rows so the result depends only on the rows, not on how they were split into blocks."""
    stats = fmt.RunningStats(dim)
    pending, pending_rows = [], 0

    def flush() -> None:
        nonlocal pending, pending_rows
        chunk = (np.concatenate(pending) if len(pending) > 1 else pending[0]).astype(np.float64)
        # Chunks that fit in cache: two passes over each in float64 without a corpus-sized temporary.
        mean = chunk.mean(axis=0)
        centred = chunk - mean
        stats.merge(fmt.RunningStats(dim, len(chunk), mean, np.einsum("ij,ij->j", centred, centred)))
        pending, pending_rows = [], 0

    for arr in blocks:
        pos = 0
        while pos < len(arr):
            take = min(_STATS_ROWS - pending_rows, len(arr) - pos)
            pending.append(arr[pos:pos + take])
            pending_rows += take
            pos += take
            if pending_rows == _STATS_ROWS:
                flush()
    if pending_rows:
        flush()
    return stats


# ---------------------------------------------------------------------------------------------------------
# Tasks (run in worker processes, or inline with one worker)

# A segment: (path, start, end, first_line, kind) with kind "lines" or "document".
Segment = tuple


@dataclass
class _TaskSpec:
    task_id: int
    group: int
    segments: list  # list[Segment]
    cuts: list  # [(segment index, nominal file offset)] partial cuts; offset None: cut before that segment
    dim: int
    on_error: str
    out_path: str
    final: bool  # write the group's shard (with checksum) rather than a piece for a later merge
    backend: str | None = None


@dataclass
class _TaskResult:
    task_id: int
    group: int
    stats: list  # RunningStats per partial
    lengths: np.ndarray  # int32
    rejects: list  # (path, line, reason)
    num_records: int
    num_fast: int  # records converted by the block fast path
    parsed_bytes: int
    out_path: str | None  # None when nothing was kept
    shard_bytes: int = 0
    sha256: str = ""
    failed: bool = False


def _worker_init() -> None:
    # The parsers create no reference cycles; the cyclic collector only costs time here.
    gc.disable()


class _TaskState:
    """What a task has produced so far; `partial` holds the blocks of the partial being filled."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.blocks, self.partial, self.lengths, self.lines, self.paths = [], [], [], [], []
        self.stats, self.rejects = [], []
        self.num_records = self.num_fast = 0

    def add(self, path: str | list, out: _BlockOut) -> None:
        """Records of `out`, all from the file `path`, or (a list) from one file each, every one kept."""
        self.num_records += out.num_records
        self.num_fast += out.num_fast
        if isinstance(path, list):
            assert not out.rejects and len(path) == sum(len(x) for x in out.lengths)
            self.paths.extend(path)
        else:
            self.rejects.extend((path, line, reason) for line, reason in out.rejects)
            self.paths.extend([path] * sum(len(x) for x in out.lengths))
        if out.values:
            self.partial.extend(out.values)
            self.lengths.extend(out.lengths)
            self.lines.extend(out.lines)

    def close_partial(self) -> None:
        self.stats.append(_values_stats(self.partial, self.dim))
        self.blocks.extend(self.partial)
        self.partial = []


def _run_task(spec: _TaskSpec) -> _TaskResult:
    backend = parser_backend(spec.backend)
    dim, on_error = spec.dim, spec.on_error
    st = _TaskState(dim)
    parsed_bytes = 0
    ok = True
    docs, docs_bytes = [], 0  # consecutive whole .json files, converted together
    for i, (path, start, end, first_line, kind) in enumerate(spec.segments):
        seg_cuts = [off for j, off in spec.cuts if j == i]
        if docs and (None in seg_cuts or kind != "document"):
            ok = _documents_into(docs, dim, st, on_error, backend)
            docs, docs_bytes = [], 0
            if not ok:
                break
        if None in seg_cuts:
            st.close_partial()
        try:
            data = _read_range(path, start, end)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
        parsed_bytes += end - start
        if kind == "document":
            docs.append((path, data))
            docs_bytes += len(data)
            if docs_bytes >= _BLOCK_BYTES:
                ok = _documents_into(docs, dim, st, on_error, backend)
                docs, docs_bytes = [], 0
            del data
        else:
            out = _BlockOut()
            offs = [off - start for off in seg_cuts if off is not None]
            texts, lines, starts = _split_lines(data, first_line, bom=start == 0, starts=bool(offs))
            del data
            k0 = 0
            for rel in offs:
                # The partial ends before the first line that starts at or after the cut.
                line_at_cut = first_line + int(np.searchsorted(starts, max(rel, 0), side="left"))
                k = bisect_left(lines, line_at_cut, lo=k0)
                ok = _records_into(texts[k0:k], lines[k0:k], dim, out, on_error, backend)
                st.add(path, out)
                out = _BlockOut()
                k0 = k
                if not ok:
                    break
                st.close_partial()
            if ok:
                ok = _records_into(texts[k0:], lines[k0:], dim, out, on_error, backend)
                st.add(path, out)
        if not ok:
            break
    if ok and docs:
        ok = _documents_into(docs, dim, st, on_error, backend)
    if ok:
        st.close_partial()
    lengths = np.concatenate(st.lengths) if st.lengths else np.zeros(0, np.int64)
    result = _TaskResult(
        spec.task_id, spec.group, st.stats, lengths.astype(np.int32), st.rejects, st.num_records, st.num_fast,
        parsed_bytes, None, failed=not ok,
    )
    if not ok or len(lengths) == 0:
        return result
    values = np.concatenate(st.blocks) if len(st.blocks) > 1 else st.blocks[0]
    st.blocks = []
    lines = np.concatenate(st.lines)
    result.out_path = spec.out_path
    if spec.final:
        table = fmt.sequences_to_table(values, lengths, st.paths, lines, dim)
        del values
        result.shard_bytes, result.sha256 = fmt.write_shard(spec.out_path, table)
    else:
        # A piece is read back only by _merge_pieces, in this run: plain buffers, no Arrow to decode.
        with open(spec.out_path, "wb") as f:
            pickle.dump((values, lengths, st.paths, lines), f, protocol=5)
    return result


def _merge_pieces(piece_paths: list[str], out_path: str, dim: int) -> tuple[int, str]:
    """Concatenate piece files (in order) into one shard, built exactly as a single task would build it."""
    values, lengths, paths, lines = [], [], [], []
    for p in piece_paths:
        with open(p, "rb") as f:
            piece_values, piece_lengths, piece_paths_, piece_lines = pickle.load(f)
        values.append(piece_values)
        lengths.append(piece_lengths)
        paths.extend(piece_paths_)
        lines.append(piece_lines)
    table = fmt.sequences_to_table(
        np.concatenate(values).reshape(-1, dim), np.concatenate(lengths), paths, np.concatenate(lines), dim
    )
    del values
    result = fmt.write_shard(out_path, table)
    for p in piece_paths:
        os.unlink(p)
    return result


# ---------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class _Source:
    path: str  # as shown in provenance: the SRC argument joined with the path below it
    size: int
    mtime_ns: int
    kind: str  # "lines" (.jsonl) or "document" (.json and explicitly named files)

    def fingerprint(self) -> list:
        return [self.path, self.size, self.mtime_ns]


def list_sources(sources: Sequence[str | os.PathLike], exclude: Path | None = None) -> tuple[list[_Source], int]:
    """Input files under `sources`, sorted by path, and the number of other files ignored in folders."""
    found: dict[str, _Source] = {}
    ignored = 0
    exclude_real = exclude.resolve() if exclude is not None else None
    for src in sources:
        src_str = os.fspath(src)
        p = Path(src_str)
        if not p.exists():
            raise UserError(f"{src_str}: no such file or folder")
        real = p.resolve()
        if exclude_real is not None and (real == exclude_real or exclude_real in real.parents):
            raise UserError(f"{src_str}: is inside the output folder {exclude}; pick an output folder outside the inputs")
        if p.is_file():
            _add_source(found, os.path.normpath(src_str))
            continue
        for root, dirs, files in os.walk(src_str):
            if exclude_real is not None:
                dirs[:] = [d for d in dirs if Path(root, d).resolve() != exclude_real]
            for name in files:
                full = os.path.normpath(os.path.join(root, name))
                if name.endswith(_INPUT_SUFFIXES):
                    _add_source(found, full)
                else:
                    ignored += 1
    return [found[k] for k in sorted(found)], ignored


def _add_source(found: dict, path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    found[path] = _Source(path, st.st_size, st.st_mtime_ns, "lines" if path.endswith(".jsonl") else "document")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------------
# Planning: groups (shards, reuse units) and partials (statistics units, parallel tasks)


@dataclass
class _Group:
    nominal: list  # [(source, start, end)] nominal byte spans (range groups of big files use k*S .. (k+1)*S)
    key: str = ""
    segments: list = field(default_factory=list)  # actual Segments, resolved for groups that are built
    cuts: list = field(default_factory=list)  # partial cuts: [(segment index, nominal offset or None)]

    @property
    def nominal_bytes(self) -> int:
        return sum(e - s for _, s, e in self.nominal)


def _cdc_cut(path: str) -> bool:
    return (zlib.crc32(path.encode()) & _CDC_MASK) == 0


def _is_lines_document(src: _Source) -> bool:
    """Whether a big .json file is JSON Lines (so it can be split at line boundaries)."""
    with open(src.path, "rb") as f:
        head = f.read(1 << 20)
        while b"\n" not in head.lstrip(_BOM + b" \t\r\n") and len(head) < src.size:
            more = f.read(1 << 20)
            if not more:
                break
            head += more
    if head.startswith(_BOM):
        head = head[len(_BOM):]
    first = _first_record_line(head)
    if first is None or len(first) >= len(head.rstrip()):
        return False
    try:
        _decode_json(first)
    except RecordError:
        return False
    return True


def _plan_groups(sources: list[_Source], shard_bytes: int, settings_key: str) -> list[_Group]:
    groups: list[_Group] = []
    current: list = []
    current_bytes = 0

    def close() -> None:
        nonlocal current, current_bytes
        if current:
            groups.append(_Group(current))
        current, current_bytes = [], 0

    for src in sources:
        splittable = src.kind == "lines" or (src.size > shard_bytes and _is_lines_document(src))
        if src.size > shard_bytes and splittable:
            close()
            for k in range(math.ceil(src.size / shard_bytes)):
                groups.append(_Group([(src, k * shard_bytes, min((k + 1) * shard_bytes, src.size))]))
            continue
        current.append((src, 0, src.size))
        current_bytes += src.size
        if current_bytes >= shard_bytes or (current_bytes >= shard_bytes // 4 and _cdc_cut(src.path)):
            close()
    close()
    for g in groups:
        ident = [settings_key] + [[*src.fingerprint(), s, e] for src, s, e in g.nominal]
        g.key = hashlib.sha256(orjson.dumps(ident)).hexdigest()[:32]
    return groups


def _resolve_cuts(path: str, size: int, offsets: Iterable[int]) -> dict[int, tuple[int, int]]:
    """For each nominal byte offset, the first line start at or after it and that line's 1-based number
    (offsets at or past the end map to (size, 0): no line number is needed there). One sequential read of
    the file up to the last offset before its end."""
    result: dict[int, tuple[int, int]] = {}
    with open(path, "rb") as f:
        pos, line = 0, 1  # pos is a line start; line is its number
        for off in sorted(set(offsets)):
            if off <= 0:
                result[off] = (0, 1)
                continue
            if off >= size:
                result[off] = (size, 0)
                continue
            f.seek(off - 1)
            actual, probe = size, off - 1
            while chunk := f.read(1 << 16):
                i = chunk.find(b"\n")
                if i >= 0:
                    actual = probe + i + 1
                    break
                probe += len(chunk)
            f.seek(pos)
            remaining = actual - pos
            while remaining > 0:
                chunk = f.read(min(_READ_BYTES, remaining))
                if not chunk:
                    break
                line += chunk.count(b"\n")
                remaining -= len(chunk)
            pos = actual
            result[off] = (actual, line)
    return result


def _resolve_groups(groups: list[_Group], partial_bytes: int, kinds: dict[str, str]) -> None:
    """Fill each group's line-aligned segments and its partial cuts (nominal offsets, resolved by whoever
    reads the text: the task itself, or `_split_partials` when partials run as separate tasks)."""
    starts: dict[str, set] = {}
    for g in groups:
        for src, s, e in g.nominal:
            if kinds[src.path] == "lines":
                starts.setdefault(src.path, set()).update((s, e))
    sizes = {src.path: src.size for g in groups for src, _, _ in g.nominal}
    resolved = {path: _resolve_cuts(path, sizes[path], offs) for path, offs in starts.items()}
    for g in groups:
        g.segments, g.cuts = [], []
        offset = 0  # position in the group's nominal byte stream
        for i, (src, s, e) in enumerate(g.nominal):
            kind = kinds[src.path]
            p = (offset // partial_bytes + 1) * partial_bytes  # the next partial boundary in the stream
            if kind == "lines":
                (a, line), (b, _) = resolved[src.path][s], resolved[src.path][e]
                g.segments.append((src.path, a, b, line, kind))
                while p < offset + (e - s):
                    g.cuts.append((i, s + (p - offset)))
                    p += partial_bytes
            else:
                g.segments.append((src.path, 0, src.size, 1, kind))
                if p < offset + (e - s):
                    g.cuts.append((i + 1, None))  # a document is atomic: the cut moves to the next file
            offset += e - s
        g.cuts = [c for c in g.cuts if c[0] < len(g.segments)]


def _split_partials(g: _Group) -> list[list]:
    """The group's partials as segment lists (reads the files to find line boundaries and numbers)."""
    offsets: dict[str, list] = {}
    for i, off in g.cuts:
        if off is not None:
            offsets.setdefault(g.segments[i][0], []).append(off)
    resolved = {}
    for path, offs in offsets.items():
        resolved[path] = _resolve_cuts(path, os.path.getsize(path), offs)
    partials: list[list] = [[]]
    for i, (path, a, b, line, kind) in enumerate(g.segments):
        for j, off in g.cuts:
            if j != i:
                continue
            if off is None:
                partials.append([])
                continue
            cut, cut_line = resolved[path][off]
            cut = min(max(cut, a), b)
            if cut > a:
                partials[-1].append((path, a, cut, line, kind))
                a, line = cut, cut_line
            partials.append([])
        if b > a or kind == "document":
            partials[-1].append((path, a, b, line, kind))
    return [p for p in partials if p]


# ---------------------------------------------------------------------------------------------------------
# Progress and result


class ConvertProgress:
    """Receives progress events; the CLI subclasses it to draw a bar. All methods are optional."""

    def start(self, total_bytes: int, total_files: int, reused_bytes: int) -> None:
        pass

    def advance(self, parsed_bytes: int, records: int, files: int) -> None:
        pass

    def stage(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class ConvertResult:
    out: Path
    index: fmt.Index
    num_records: int  # records seen = num_sequences + num_rejected
    num_sequences: int
    num_rejected: int
    num_ignored_files: int
    num_files: int
    num_tokens: int
    input_bytes: int  # bytes of every input file
    parsed_bytes: int  # bytes parsed in this run (0 when everything was reused)
    groups_built: int
    groups_reused: int
    workers: int
    backend: str
    elapsed_s: float
    rejects_path: Path | None
    # Records parsed in this run (reused groups not counted) by the block fast path, and one by one by the
    # precise path (every record of a block that held a bad or unusual one).
    num_records_fast: int = 0
    num_records_slow: int = 0

    @property
    def input_mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.elapsed_s, 1e-9)


# ---------------------------------------------------------------------------------------------------------
# The dataset folder: lock, leftovers, previous state


# Files of ours at the top of a dataset folder that are garbage unless index.json names them.
_OUR_TOP_FILES = re.compile(
    r"^(lengths.*\.npy|sources-.*\.json|\.(index\.json|rejects\.jsonl|lengths.*\.npy|sources-.*\.json)\..*\.tmp)$"
)
_OUR_FIXED_NAMES = re.compile(r"^(shards|index\.json|rejects\.jsonl|\.convert\.lock|\.staging-.*)$")


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if not out.exists() or fmt.is_dataset(out) or force:
        return
    strangers = [p.name for p in out.iterdir() if not (_OUR_TOP_FILES.match(p.name) or _OUR_FIXED_NAMES.match(p.name))]
    if strangers:
        raise UserError(
            f"{out}: folder is not empty and is not a streamtrain dataset (it holds {strangers[0]!r}); "
            "pick a new or empty folder for --out"
        )


class _Lock:
    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "_Lock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise UserError(f"{self.path.parent}: another `streamtrain convert` is writing this folder") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def _referenced(out: Path, index: fmt.Index | None) -> set[str]:
    if index is None:
        return set()
    names = {s.file for s in index.shards} | {index.lengths_file}
    manifest = (index.extra.get("convert") or {}).get("manifest")
    if manifest:
        names.add(manifest)
    return names


def _collect_garbage(out: Path, index: fmt.Index | None) -> None:
    """Delete what a crashed or superseded run left: staging folders and our files the index does not name."""
    keep = _referenced(out, index)
    for p in out.iterdir():
        name = p.name
        if name.startswith(STAGING_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and name not in keep and _OUR_TOP_FILES.match(name):
            p.unlink(missing_ok=True)
    shard_dir = out / fmt.SHARD_DIR
    if shard_dir.is_dir():
        for p in shard_dir.iterdir():
            rel = f"{fmt.SHARD_DIR}/{p.name}"
            if p.is_file() and rel not in keep and (p.name.endswith(".arrow") or p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)


def _load_previous(out: Path) -> tuple[fmt.Index | None, dict | None]:
    if not fmt.is_dataset(out):
        return None, None
    try:
        index = fmt.read_index(out)
    except DataError:
        return None, None
    info = index.extra.get("convert") or {}
    name = info.get("manifest")
    if not name:
        return index, None
    try:
        manifest = orjson.loads((out / name).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return index, None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        return index, None
    return index, manifest


# ---------------------------------------------------------------------------------------------------------
# Dimension


def _detect_dim(sources: list[_Source]) -> tuple[int, _Source] | None:
    """Width of the first valid record in sorted order (reading as little as possible)."""
    for src in sources:
        for text in _iter_record_texts(src):
            try:
                arr = parse_record(text, None)
            except RecordError:
                continue
            return arr.shape[1], src
    return None


def _iter_record_texts(src: _Source) -> Iterator[bytes]:
    if src.kind == "document" and src.size <= (64 << 20):
        data = _read_range(src.path, 0, src.size)
        try:
            _decode_json(data)
            yield data
            return
        except RecordError:
            pass
        if not _looks_like_json_lines(data):
            return
        yield from _split_lines(data, 1)[0]
        return
    with open(src.path, "rb") as f:
        rest = b""
        first = True
        while chunk := f.read(1 << 20):
            if first and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM):]
            first = False
            rest += chunk
            *complete, rest = rest.split(b"\n")
            for text in complete:
                if text and not text.isspace():
                    yield text
        if rest and not rest.isspace():
            yield rest


# ---------------------------------------------------------------------------------------------------------
# The conversion


def _crash_point(name: str) -> None:
    """Test hook: STREAMTRAIN_TEST_CRASH_AT=name kills the process here, as a power cut would."""
    if os.environ.get("STREAMTRAIN_TEST_CRASH_AT") == name:
        os._exit(86)


def convert(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    on_error: str = "fail",
    dim: int | None = None,
    shard_mb: float = 64,
    force: bool = False,
    progress: ConvertProgress | None = None,
) -> ConvertResult:
    """Convert JSON/JSONL `sources` (files or folders) into the dataset folder `out`; see the module docstring."""
    t0 = time.perf_counter()
    progress = progress or ConvertProgress()
    if on_error not in ON_ERROR_CHOICES:
        raise UserError(f"--on-error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
    if dim is not None and dim < 1:
        raise UserError(f"--dim must be >= 1, got {dim}")
    if not shard_mb > 0:
        raise UserError(f"--shard-mb must be > 0, got {shard_mb}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if not sources:
        raise UserError("no input given (pass one or more SRC files or folders)")
    out = Path(out)
    _check_out_dir(out, force)
    src_list, num_ignored = list_sources(sources, exclude=out)
    if not src_list:
        raise UserError(
            f"no .json or .jsonl files in {', '.join(os.fspath(s) for s in sources)}"
            + (f" ({num_ignored} other files ignored)" if num_ignored else "")
        )
    shard_bytes = max(1, int(shard_mb * (1 << 20)))
    partial_bytes = max(_MIN_PARTIAL_BYTES, shard_bytes // 16)
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        prev_index, manifest = _load_previous(out)
        if force:
            manifest = None
        _collect_garbage(out, prev_index)
        dim, dim_source = _resolve_dim(src_list, dim, manifest)
        settings = {"dim": dim, "on_error": on_error, "shard_bytes": shard_bytes, "partial_bytes": partial_bytes}
        settings_key = orjson.dumps(settings).decode()
        groups = _plan_groups(src_list, shard_bytes, settings_key)
        old_groups = {}
        if manifest is not None and manifest.get("settings") == settings and prev_index is not None:
            old_groups = _reusable_groups(out, prev_index, manifest)
        build = [i for i, g in enumerate(groups) if g.key not in old_groups]
        kinds = {}
        for i in build:
            for src, s, e in groups[i].nominal:
                if src.path not in kinds:
                    big_json = src.kind == "document" and src.size > partial_bytes and _is_lines_document(src)
                    kinds[src.path] = "lines" if src.kind == "lines" or big_json else "document"
        _resolve_groups([groups[i] for i in build], partial_bytes, kinds)

        token = secrets.token_hex(4)
        staging = out / f"{STAGING_PREFIX}{token}"
        staging.mkdir()
        try:
            built = _execute(groups, build, dim, on_error, workers, staging, token, progress,
                             sum(g.nominal_bytes for g in groups), len(src_list))
            return _commit(
                out, groups, build, built, old_groups, prev_index, settings, dim, dim_source, on_error,
                num_ignored, src_list, staging, token, t0, workers, progress,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _resolve_dim(src_list: list[_Source], dim: int | None, manifest: dict | None) -> tuple[int, list | None]:
    if dim is not None:
        return dim, None
    if manifest is not None and manifest.get("dim_source"):
        # Reuse the detected width while every file up to the one it came from is unchanged.
        recorded = manifest["dim_source"]
        prefix = manifest.get("dim_prefix") or []
        now = [s.fingerprint() for s in src_list[: len(prefix)]]
        if now == prefix and prefix and prefix[-1] == recorded:
            return int(manifest["settings"]["dim"]), recorded
    found = _detect_dim(src_list)
    if found is None:
        raise DataError(
            f"no valid record in {len(src_list)} input file{'s' if len(src_list) != 1 else ''} to take --dim from "
            "(a record is an array of at least 2 vectors of equal length); run with --on-error skip --dim D to see why"
        )
    width, src = found
    return width, src.fingerprint()


def _reusable_groups(out: Path, index: fmt.Index, manifest: dict) -> dict[str, dict]:
    """Groups of the previous run whose shard is still what the index says (same file, size, checksum)."""
    shards = {s.file: s for s in index.shards}
    lengths = None
    usable = {}
    for g in manifest.get("groups", []):
        shard = g.get("shard")
        if shard is not None:
            info = shards.get(shard)
            path = out / shard
            if info is None or info.sha256 != g.get("sha256") or not path.is_file() or path.stat().st_size != info.bytes:
                continue
            if lengths is None:
                try:
                    lengths = fmt.load_lengths(index)
                except DataError:
                    return {}
            g = dict(g, lengths=np.asarray(lengths[info.first_id: info.first_id + info.num_sequences], dtype=np.int32),
                     info=info)
        else:
            g = dict(g, lengths=np.zeros(0, np.int32), info=None)
        usable[g["key"]] = g
    return usable


def _make_tasks(groups, build, dim, on_error, workers, staging: Path, token: str):
    """Task specs in group order, and for groups split over several tasks the ids of their piece tasks.
    With fewer groups than workers can share, a group's partials become separate tasks merged afterwards."""
    many_tasks = workers > 1 and len(build) < 2 * workers
    specs, pieces_of = [], {}
    backend = os.environ.get("STREAMTRAIN_JSON_BACKEND")
    for gi in build:
        g = groups[gi]
        final_path = str(staging / f"shard-{token}-{gi:06d}.arrow")
        partials = _split_partials(g) if many_tasks and g.cuts else None
        if partials and len(partials) > 1:
            ids = []
            for pi, partial in enumerate(partials):
                piece = str(staging / f"piece-{gi:06d}-{pi:06d}.pickle")
                ids.append(len(specs))
                specs.append(_TaskSpec(len(specs), gi, partial, [], dim, on_error, piece, False, backend))
            pieces_of[gi] = ids
        else:
            specs.append(_TaskSpec(len(specs), gi, g.segments, g.cuts, dim, on_error, final_path, True, backend))
    return specs, pieces_of


@dataclass
class _Built:
    stats: fmt.RunningStats
    lengths: np.ndarray
    rejects: list
    num_records: int
    num_fast: int
    shard_path: str | None
    shard_bytes: int = 0
    sha256: str = ""


def _execute(groups, build, dim, on_error, workers, staging, token, progress, total_bytes, num_files):
    specs, pieces_of = _make_tasks(groups, build, dim, on_error, workers, staging, token)
    crash_after = int(os.environ.get("STREAMTRAIN_TEST_CRASH_AFTER_SHARDS", "0") or 0)
    results: dict[int, _TaskResult] = {}
    merged: dict[int, tuple[int, str]] = {}
    shards_written = 0
    build_bytes = sum(groups[i].nominal_bytes for i in build)
    n_procs = min(workers, len(specs))
    sizes = {src.path: src.size for i in build for src, _, _ in groups[i].nominal}

    def on_result(r: _TaskResult) -> None:
        nonlocal shards_written
        results[r.task_id] = r
        if r.failed:
            raise _Abort()
        files = sum(1 for seg in specs[r.task_id].segments if seg[2] == sizes[seg[0]])
        progress.advance(r.parsed_bytes, r.num_records, files)
        if r.out_path and specs[r.task_id].final:
            shards_written += 1
            if crash_after and shards_written >= crash_after:
                os._exit(86)

    progress.start(build_bytes, num_files, total_bytes - build_bytes)
    try:
        if n_procs <= 1:
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                for spec in specs:
                    on_result(_run_task(spec))
                for gi, ids in pieces_of.items():
                    merged[gi] = _merge_one(results, ids, staging, token, gi, dim)
            finally:
                if was_enabled:
                    gc.enable()
        else:
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            # Workers are forked before any progress thread starts.
            with ctx.Pool(n_procs, initializer=_worker_init) as pool:
                pending_merges = {}
                # Largest tasks first, so the last ones to finish are small (results are keyed by task id,
                # so the order of execution changes nothing in the output).
                by_size = sorted(specs, key=lambda s: -sum(seg[2] - seg[1] for seg in s.segments))
                for r in pool.imap_unordered(_run_task, by_size):
                    on_result(r)
                    for gi, ids in pieces_of.items():
                        if gi not in pending_merges and all(i in results for i in ids):
                            paths = [results[i].out_path for i in ids if results[i].out_path]
                            out_path = str(staging / f"shard-{token}-{gi:06d}.arrow")
                            pending_merges[gi] = pool.apply_async(_merge_pieces, (paths, out_path, dim)) if paths else None
                for gi, job in pending_merges.items():
                    merged[gi] = (job.get(), str(staging / f"shard-{token}-{gi:06d}.arrow")) if job else None
    except _Abort:
        failed = [r for r in results.values() if r.rejects]
        failed.sort(key=lambda r: r.task_id)
        path, line, reason = failed[0].rejects[0]
        more = sum(len(r.rejects) for r in failed) - 1
        extra = f" ({more} more error{'s' if more != 1 else ''} seen)" if more else ""
        raise DataError(
            f"{path}:{line}: {reason}{extra}; no dataset written (--on-error skip keeps the valid records "
            "and lists every reject in rejects.jsonl)"
        ) from None

    built: dict[int, _Built] = {}
    for gi in build:
        ids = pieces_of.get(gi) or [s.task_id for s in specs if s.group == gi]
        rs = [results[i] for i in ids]
        stats = fmt.RunningStats(dim)
        for r in rs:
            for st in r.stats:
                stats.merge(st)
        b = _Built(
            stats,
            np.concatenate([r.lengths for r in rs]) if rs else np.zeros(0, np.int32),
            [rej for r in rs for rej in r.rejects],
            sum(r.num_records for r in rs),
            sum(r.num_fast for r in rs),
            None,
        )
        if gi in pieces_of:
            m = merged.get(gi)
            if m is not None:
                (b.shard_bytes, b.sha256), b.shard_path = m
        else:
            r = rs[0]
            b.shard_path, b.shard_bytes, b.sha256 = r.out_path, r.shard_bytes, r.sha256
        built[gi] = b
    return built


def _merge_one(results, ids, staging, token, gi, dim):
    paths = [results[i].out_path for i in ids if results[i].out_path]
    if not paths:
        return None
    out_path = str(staging / f"shard-{token}-{gi:06d}.arrow")
    return _merge_pieces(paths, out_path, dim), out_path


class _Abort(Exception):
    pass


def _commit(out, groups, build, built, old_groups, prev_index, settings, dim, dim_source, on_error,
            num_ignored, src_list, staging, token, t0, workers, progress) -> ConvertResult:
    build_set = set(build)
    shards: list[fmt.ShardInfo] = []
    lengths_parts, rejects, manifest_groups = [], [], []
    stats = fmt.RunningStats(dim)
    num_records = 0
    shard_dir = out / fmt.SHARD_DIR
    shard_dir.mkdir(exist_ok=True)
    moves = []
    first_id = 0
    for gi, g in enumerate(groups):
        if gi in build_set:
            b = built[gi]
            gstats, glengths, grejects, grecords = b.stats, b.lengths, b.rejects, b.num_records
            shard_file = sha = None
            if b.shard_path is not None:
                shard_file = f"{fmt.SHARD_DIR}/{Path(b.shard_path).name}"
                sha = b.sha256
                moves.append((b.shard_path, out / shard_file))
                shards.append(fmt.ShardInfo(shard_file, len(glengths), int(glengths.sum(dtype=np.int64)),
                                            b.shard_bytes, sha, first_id))
        else:
            old = old_groups[g.key]
            gstats = fmt.RunningStats.from_json(old["stats"]) if old["stats"]["count"] else fmt.RunningStats(dim)
            glengths = old["lengths"]
            grejects = [tuple(r) for r in old["rejects"]]
            grecords = old["num_records"]
            shard_file, sha = old["shard"], old.get("sha256")
            if old["info"] is not None:
                i = old["info"]
                shards.append(fmt.ShardInfo(i.file, i.num_sequences, i.num_tokens, i.bytes, i.sha256, first_id))
        first_id += len(glengths)
        stats.merge(gstats)
        lengths_parts.append(glengths)
        rejects.extend(grejects)
        num_records += grecords
        manifest_groups.append({
            "key": g.key,
            "sources": [[*src.fingerprint(), s, e] for src, s, e in g.nominal],
            "shard": shard_file,
            "sha256": sha,
            "num_records": grecords,
            "stats": gstats.to_json(),
            "rejects": [list(r) for r in grejects],
        })
    lengths = np.concatenate(lengths_parts).astype(np.int32) if lengths_parts else np.zeros(0, np.int32)
    if len(lengths) == 0:
        first = f" (first: {rejects[0][0]}:{rejects[0][1]}: {rejects[0][2]})" if rejects else ""
        raise DataError(f"no valid records: {num_records} seen, {len(rejects)} rejected{first}")

    progress.stage("committing")
    for src_path, dst in moves:
        os.replace(src_path, dst)
    fmt._fsync_dir(shard_dir)
    lengths_buf = fmt._npy_bytes(lengths)
    lengths_file = f"lengths-{token}.npy"
    fmt.atomic_write_bytes(out / lengths_file, lengths_buf)
    manifest_file = f"sources-{token}.json"
    dim_prefix = None
    if dim_source is not None:
        names = [s.fingerprint() for s in src_list]
        dim_prefix = names[: names.index(dim_source) + 1] if dim_source in names else None
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "settings": settings,
        "dim_source": dim_source if dim_prefix else None,
        "dim_prefix": dim_prefix,
        "groups": manifest_groups,
    }
    fmt.atomic_write_bytes(out / manifest_file, orjson.dumps(manifest))
    rejects_path = out / fmt.REJECTS_FILE
    if rejects:
        fmt.atomic_write_bytes(
            rejects_path, b"".join(orjson.dumps({"path": p, "line": ln, "reason": r}) + b"\n" for p, ln, r in rejects)
        )
    num_tokens = int(lengths.sum(dtype=np.int64))
    input_bytes = sum(s.size for s in src_list)
    parsed = sum(groups[i].nominal_bytes for i in build)
    index = fmt.Index(
        root=out,
        dim=dim,
        num_sequences=len(lengths),
        num_tokens=num_tokens,
        shards=shards,
        mean=stats.mean,
        std=stats.std,
        lengths_file=lengths_file,
        lengths_sha256=hashlib.sha256(lengths_buf).hexdigest(),
        num_rejected=len(rejects),
        extra={
            "num_records": num_records,
            "num_ignored_files": num_ignored,
            "num_files": len(src_list),
            "stats": stats.to_json(),
            "convert": {
                "manifest": manifest_file,
                "on_error": on_error,
                "shard_bytes": settings["shard_bytes"],
                "input_bytes": input_bytes,
                "groups_built": len(build),
                "groups_reused": len(groups) - len(build),
            },
        },
    )
    _crash_point("before-index")
    fmt.write_index(index)
    _crash_point("after-index")
    if not rejects:
        rejects_path.unlink(missing_ok=True)
    _collect_garbage(out, index)
    progress.finish()
    return ConvertResult(
        out=out,
        index=index,
        num_records=num_records,
        num_sequences=len(lengths),
        num_rejected=len(rejects),
        num_ignored_files=num_ignored,
        num_files=len(src_list),
        num_tokens=num_tokens,
        input_bytes=input_bytes,
        parsed_bytes=parsed,
        groups_built=len(build),
        groups_reused=len(groups) - len(build),
        workers=workers,
        backend=parser_backend().name,
        elapsed_s=time.perf_counter() - t0,
        rejects_path=rejects_path if rejects else None,
        num_records_fast=sum(b.num_fast for b in built.values()),
        num_records_slow=sum(b.num_records - b.num_fast for b in built.values()),
    )
