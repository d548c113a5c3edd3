"""Input discovery: which files a convert run reads, what kind of text each holds, and reading them.

Folders are walked recursively for `.json` and `.jsonl` files; other files, and hidden files and folders
(a name that starts with "."), are counted as ignored, and a folder that cannot be read is an error. An
explicitly named file is read whatever its name. Also finds the vector width when --dim is not given: the
width of the first valid record in sorted order.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from streamtrain.convert.records import (
    BOM,
    RecordError,
    blank_file_reason,
    is_blank,
    is_json,
    looks_like_json_lines,
    parse_record,
    split_lines,
)
from streamtrain.errors import UserError

__all__ = [
    "list_sources", "Source", "reading_input", "read_range", "blank_file_size", "detect_dim", "iter_record_texts",
    "is_lines_document",
]

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
    """Input files under `sources`, sorted by path, and the number of other files (and hidden folders) ignored
    in folders."""
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
        for root, dirs, files in os.walk(src_str, onerror=_unreadable_folder):
            if exclude_real is not None:
                dirs[:] = [d for d in dirs if Path(root, d).resolve() != exclude_real]
            # Hidden entries are tool state, not data: .git/, editor swap files, macOS ._name.json files
            # (AppleDouble metadata, not JSON). A hidden folder counts as one ignored entry, unread.
            ignored += sum(d.startswith(".") for d in dirs)
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                full = os.path.normpath(os.path.join(root, name))
                if name.endswith(_INPUT_SUFFIXES) and not name.startswith("."):
                    _add_source(found, full)
                else:
                    ignored += 1
    return [found[k] for k in sorted(found)], ignored


def _unreadable_folder(e: OSError) -> None:
    # os.walk would skip the folder and carry on: its files would be missing from the dataset unannounced.
    raise UserError(f"{e.filename}: cannot read this folder ({e.strerror or e}); fix its permissions, or leave "
                    "it out of SRC") from None


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
    with reading_input(src.path), open(src.path, "rb") as f:
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


@contextlib.contextmanager
def reading_input(path: str) -> Iterator[None]:
    """Turn an OSError while reading the input file `path` into a UserError naming it."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def read_range(path: str, start: int, end: int) -> bytes:
    with reading_input(path):
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


def blank_file_size(path: str, offset: int) -> int | None:
    """For a file whose first `offset` bytes hold nothing but white space (and a BOM): its size when the rest
    is white space too (the whole file is blank), else None. Reads only up to the first non-blank byte."""
    with reading_input(path), open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return None
        return f.tell()


def _starts_with_bom(path: str) -> bool:
    with reading_input(path), open(path, "rb") as f:
        return f.read(len(BOM)) == BOM


def detect_dim(sources: list[Source]) -> tuple[int, Source] | str:
    """Width of the first valid record in sorted order (reading as little as possible), and the file it is
    in; when no record is valid, the first problem found ("path:line: reason")."""
    problem = ""
    for src in sources:
        seen = False
        for line, text in iter_record_texts(src):
            seen = True
            try:
                arr = parse_record(text, None)
            except RecordError as e:
                problem = problem or f"{src.path}:{line}: {e}"
                continue
            return arr.shape[1], src
        if not seen:  # a file without a single non-blank line
            problem = problem or f"{src.path}:1: {blank_file_reason(src.size, _starts_with_bom(src.path))}"
    return problem


def iter_record_texts(src: Source) -> Iterator[tuple[int, bytes]]:
    """(line, text) of each record of `src`, as convert splits it; nothing for a blank file."""
    if src.kind == "document" and src.size <= (64 << 20):
        data = read_range(src.path, 0, src.size).removeprefix(BOM)
        if is_blank(data):
            return
        if not is_json(data) and looks_like_json_lines(data):
            texts, lines, _ = split_lines(data, 1)
            yield from zip(lines, texts)
        else:
            yield 1, data
        return
    with reading_input(src.path), open(src.path, "rb") as f:
        pending: list[bytes] = []  # pieces of the line being read (a line may span many chunks)
        first = True
        line = 1  # number of the line that `pending` begins
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
                    yield line, text
                line += 1
        rest = b"".join(pending)
        if rest and not rest.isspace():
            yield line, rest
