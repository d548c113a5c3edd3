"""Input discovery: which files a convert run reads, what kind of text each holds, and reading them.

Folders are walked recursively for `.json` and `.jsonl` files (other files are counted as ignored); an
explicitly named file is read whatever its name. Also finds the vector width when --dim is not given: the
width of the first valid record in sorted order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from streamtrain.convert.records import (
    _BOM,
    RecordError,
    _first_record_line,
    _is_json,
    _looks_like_json_lines,
    _split_lines,
    parse_record,
)
from streamtrain.errors import UserError

__all__ = ["list_sources"]

_INPUT_SUFFIXES = (".json", ".jsonl")


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
    # A first line that is the whole text is one document, not JSON Lines.
    return first is not None and len(first) < len(head.rstrip()) and _is_json(first)


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
        if _is_json(data):
            yield data
        elif _looks_like_json_lines(data):
            yield from _split_lines(data, 1)[0]
        return
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
