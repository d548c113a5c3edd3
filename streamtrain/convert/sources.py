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
    BOM,
    RecordError,
    is_json,
    looks_like_json_lines,
    split_lines,
    parse_record,
)
from streamtrain.errors import UserError

__all__ = ["list_sources", "Source", "read_range", "detect_dim", "is_lines_document"]

_INPUT_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Source:
    path: str  # as shown in provenance: the SRC argument joined with the path below it
    size: int
    mtime_ns: int
    kind: str  # "lines" (.jsonl) or "document" (.json and explicitly named files)
    # A rewrite that keeps the size and restores the mtime (cp -p, rsync -t) still changes the inode (a new
    # file) or the ctime (in place): no call can set ctime back, so (size, mtime, inode, ctime) catches it.
    inode: int = 0
    ctime_ns: int = 0

    def fingerprint(self) -> list:
        return [self.path, self.size, self.mtime_ns, self.inode, self.ctime_ns]


def list_sources(sources: Sequence[str | os.PathLike], exclude: Path | None = None) -> tuple[list[Source], int]:
    """Input files under `sources`, sorted by path, and the number of other files ignored in folders."""
    found: dict[str, Source] = {}
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
    kind = "lines" if path.endswith(".jsonl") else "document"
    found[path] = Source(path, st.st_size, st.st_mtime_ns, kind, st.st_ino, st.st_ctime_ns)


def is_lines_document(src: Source) -> bool:
    """Whether a big .json file is JSON Lines (so it can be split at line boundaries), decided exactly as
    `blocks.document_records` decides for the whole text. Reads only up to the end of the first non-blank
    line (and the start of the next one) unless that line is not JSON on its own."""
    parts: list[bytes] = []
    first_end = -1  # offset in the joined head of the "\n" that ends the first non-blank line
    offset = 0  # bytes in `parts`
    content = False  # whether a non-blank byte was seen
    more_after_first = False
    with open(src.path, "rb") as f:
        while chunk := f.read(1 << 20):
            if not parts and chunk.startswith(BOM):
                chunk = chunk[len(BOM):]
            parts.append(chunk)
            pos = 0
            if not content:
                stripped = chunk.lstrip()
                if not stripped:
                    offset += len(chunk)
                    continue
                content = True
                pos = len(chunk) - len(stripped)
            if first_end < 0:
                i = chunk.find(b"\n", pos)
                if i < 0:
                    offset += len(chunk)
                    continue
                first_end = offset + i
                pos = i + 1
            # Only the new chunk is searched: is there anything but white space after the first line?
            if chunk[pos:].strip():
                more_after_first = True
                break
            offset += len(chunk)
    if not content or not more_after_first:
        return False  # blank, or one line that is the whole text: one document
    first = b"".join(parts)[:first_end].strip()
    if is_json(first):
        return True  # a whole value followed by more text: not one JSON value, and JSON Lines
    # The first line is not JSON: decide on the whole text (a rare, broken file; read once more).
    data = read_range(src.path, 0, src.size).removeprefix(BOM)
    return not is_json(data) and looks_like_json_lines(data)


def read_range(path: str, start: int, end: int) -> bytes:
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


def detect_dim(sources: list[Source]) -> tuple[int, Source] | None:
    """Width of the first valid record in sorted order (reading as little as possible)."""
    for src in sources:
        for text in _iter_record_texts(src):
            try:
                arr = parse_record(text, None)
            except RecordError:
                continue
            return arr.shape[1], src
    return None


def _iter_record_texts(src: Source) -> Iterator[bytes]:
    if src.kind == "document" and src.size <= (64 << 20):
        data = read_range(src.path, 0, src.size)
        if is_json(data):
            yield data
        elif looks_like_json_lines(data):
            yield from split_lines(data, 1)[0]
        return
    with open(src.path, "rb") as f:
        pending: list[bytes] = []  # pieces of the line being read (a line may span many chunks)
        first = True
        while chunk := f.read(1 << 20):
            if first and chunk.startswith(BOM):
                chunk = chunk[len(BOM):]
            first = False
            if b"\n" not in chunk:
                pending.append(chunk)
                continue
            *complete, tail = chunk.split(b"\n")
            pending.append(complete[0])
            complete[0] = b"".join(pending)
            pending = [tail]
            for text in complete:
                if text and not text.isspace():
                    yield text
        rest = b"".join(pending)
        if rest and not rest.isspace():
            yield rest
