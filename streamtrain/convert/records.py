"""One record: decoding and validation with one precise reason per rejected record, and splitting text into
records. This is the slow path of convert, and the contract that the fast path (`blocks`) must match.

Records. A file that holds nothing but white space (or is empty) is one rejected record at line 1: almost
always a failed export, never silently zero records. A `.jsonl` file holds one record per line; a `.json` file (or any explicitly named file) holds one
record, or JSON Lines when the whole document is not one JSON value and has lines that are (see
`looks_like_json_lines`). A record is an array of vectors
`[[v1..vD], ...]` or an object with a `"sequence"` key holding one. Values are stored as
`np.float32(float(text))`: parsed to the nearest float64, then rounded to float32.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import orjson

__all__ = [
    "F32_MAX", "F32_OVERFLOW", "RecordError", "parse_record", "BOM", "is_blank", "blank_file_reason",
    "NEGATIVE_ZERO_INT", "decode_json", "is_json", "looks_like_json_lines", "split_lines",
]

F32_MAX = float(np.finfo(np.float32).max)
# Round-to-nearest-even sends |x| >= F32_MAX + half an ulp (2**128 - 2**103) to infinity; anything below it
# rounds to a finite float32, F32_MAX included. Exactly representable in float64.
F32_OVERFLOW = 2.0**128 - 2.0**103

BOM = b"\xef\xbb\xbf"


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
NEGATIVE_ZERO_INT = re.compile(rb"-0(?![0-9.eE])")


def _parse_int(text: str):
    return -0.0 if text == "-0" else int(text)


def decode_json(text: bytes):
    """Python value of `text`, or RecordError with the reason it is not a usable JSON value."""
    if b"-0" in text and NEGATIVE_ZERO_INT.search(text):
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
            if not math.isfinite(f) or abs(f) >= F32_OVERFLOW:
                raise RecordError(
                    f"vector {i} value {j} (0-based) = {v!r} overflows float32 (rounds beyond ±{F32_MAX:.8g})"
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
    return _validate_value(decode_json(text), dim)


def is_blank(data: bytes) -> bool:
    """Whether `data`, the start of a file or all of it, holds nothing but white space (after a UTF-8 BOM)."""
    return not data.removeprefix(BOM).strip()


def blank_file_reason(size: int, bom: bool) -> str:
    """Why a file of `size` bytes that holds nothing but white space (after a BOM if `bom`) is rejected."""
    if size == 0:
        return "empty file (0 bytes): nothing to convert — a failed export?"
    if bom and size == len(BOM):
        what = "a UTF-8 byte-order mark"
    else:
        what = "a UTF-8 byte-order mark and white space" if bom else "white space"
    return f"file holds only {what} ({size} bytes): nothing to convert — a failed export?"


# ---------------------------------------------------------------------------------------------------------
# Splitting text into records


def split_lines(data: bytes, first_line: int, bom: bool = False, starts: bool = False):
    """Non-blank lines of `data`, their 1-based line numbers, and (if `starts`) the byte offset of every
    line start in `data`, blank or not. `bom`: `data` begins a file, so a UTF-8 byte-order mark is dropped."""
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    offsets = None
    if starts:
        offsets = np.zeros(len(raw) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, raw), dtype=np.int64, count=len(raw)) + 1, out=offsets[1:])
    if bom and raw and raw[0].startswith(BOM):
        raw[0] = raw[0][len(BOM):]
    texts, lines = [], []
    for i, text in enumerate(raw):
        if text and not text.isspace():
            texts.append(text)
            lines.append(first_line + i)
    return texts, lines, offsets


def is_json(text: bytes) -> bool:
    """Whether `text` is one usable JSON value (as `decode_json` reads it)."""
    try:
        decode_json(text)
    except RecordError:
        return False
    return True


def _nonblank_lines(data: bytes):
    """Non-blank lines of `data`, lazily (a document may be large and is usually decided by its first lines)."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            end = len(data)
        text = data[start:end]
        if text and not text.isspace():
            yield text
        start = end + 1


def _is_record(text: bytes) -> bool:
    try:
        parse_record(text, None)
    except RecordError:
        return False
    return True


def looks_like_json_lines(data: bytes) -> bool:
    """Whether `data`, a document that is not one JSON value, is JSON Lines: it has more than one non-blank
    line, and its first non-blank line is one JSON value on its own or some line is a valid record on its
    own. A broken single document (truncated, pretty-printed) has no line that is a record by itself, so it
    stays one reject; a JSON Lines file with a bad first line keeps its good lines."""
    lines = _nonblank_lines(data)
    first = next(lines, None)
    if first is None:
        return False
    second = next(lines, None)
    if second is None:
        return False
    if is_json(first) or _is_record(second):
        return True
    return any(_is_record(text) for text in lines)
