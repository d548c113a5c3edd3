"""The output folder: one writer per binary, folder names, and replacing a previous corpus."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

from .errors import CorpusError
from .split import SPLITS

#     DIR/.manifest.json                         binaries, counts, split, field names (hidden:
#                                                `streamtrain convert DIR` reads only the records)
#     DIR/train/<binary>/part-00000.jsonl        one record per line (array or object)
#     DIR/train/<binary>/fn-00000.json           one function per file
#     DIR/val/<binary>/...                       only with --split F > 0 (model selection)
#     DIR/test/<binary>/...                      only with --test-split F > 0 (the report)
#
# Record forms: ``[[28 numbers], ...]`` (format ``json``; ``jsonl`` lines) or ``{"sequence": [...]}``
# (format ``object``); ``mixed`` is a seeded mix of all three (functions shorter than 64 instructions
# always go to jsonl parts so the file count stays sane).  ``json`` / ``object`` write one file per
# function and therefore take at most 256 functions per binary.

__all__ = [
    "FORMATS",
    "MANIFEST_NAME",
    "MAX_SINGLE_FILES_PER_BINARY",
    "BinaryWriter",
    "folder_name",
    "prepare_out_dir",
    "write_manifest",
]

FORMATS: tuple[str, ...] = ("mixed", "json", "object", "jsonl")
MANIFEST_NAME = ".manifest.json"
# Where corpora written before the manifest was hidden keep it; such a folder may still be replaced.
_OLD_MANIFEST_NAME = "manifest.json"
MAX_SINGLE_FILES_PER_BINARY = 256
# Parts roll at ~1 MiB.
_JSONL_PART_BYTES = 1 << 20
_MIXED_SINGLE_FILE_MIN_INSTRUCTIONS = 64

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def folder_name(path: str, used: set[str]) -> str:
    """A file-system-safe folder name for the binary at ``path``, unique within ``used`` (updated)."""
    base = _NAME_UNSAFE.sub("_", os.path.basename(path)) or "binary"
    if base.startswith("."):
        base = "_" + base
    name, n = base, 2
    while name in used:
        name = f"{base}-{n}"
        n += 1
    used.add(name)
    return name


class BinaryWriter:
    """Writes one binary's records into DIR/<split>/<name>/ in the chosen format."""

    def __init__(self, folder: Path, fmt: str, rng: random.Random) -> None:
        self.folder = folder
        self.fmt = fmt
        self.rng = rng
        self.files = 0
        self.single_files = 0
        self.bytes_written = 0
        self._part: list[str] = []
        self._part_bytes = 0
        self._parts = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _write_file(self, name: str, text: str) -> None:
        with open(self.folder / name, "w", encoding="ascii", newline="\n") as handle:
            handle.write(text)
        self.files += 1
        self.bytes_written += len(text)

    def _write_single(self, text: str) -> None:
        self._write_file(f"fn-{self.single_files:05d}.json", text)
        self.single_files += 1

    def add(self, array_text: str, n_instructions: int) -> None:
        as_object = '{"sequence":' + array_text + "}"
        if self.fmt == "json":
            self._write_single(array_text + "\n")
        elif self.fmt == "object":
            self._write_single(as_object + "\n")
        elif self.fmt == "jsonl":
            self._add_line(array_text)
        else:
            # mixed: long functions sometimes get a file of their own, short ones
            # always share jsonl parts.  Draws happen in a fixed order, so the
            # layout is deterministic for the seed.
            draw = self.rng.random()
            single_ok = (
                n_instructions >= _MIXED_SINGLE_FILE_MIN_INSTRUCTIONS
                and self.single_files < MAX_SINGLE_FILES_PER_BINARY
            )
            if single_ok and draw < 1 / 3:
                self._write_single(array_text + "\n")
            elif single_ok and draw < 2 / 3:
                self._write_single(as_object + "\n")
            else:
                self._add_line(array_text if self.rng.random() < 0.5 else as_object)

    def _add_line(self, record: str) -> None:
        self._part.append(record)
        self._part.append("\n")
        self._part_bytes += len(record) + 1
        if self._part_bytes >= _JSONL_PART_BYTES:
            self._flush_part()

    def _flush_part(self) -> None:
        if self._part:
            self._write_file(f"part-{self._parts:05d}.jsonl", "".join(self._part))
            self._parts += 1
            self._part = []
            self._part_bytes = 0

    def close(self) -> None:
        self._flush_part()

    @property
    def pending_bytes(self) -> int:
        return self.bytes_written + self._part_bytes


def prepare_out_dir(out: Path) -> None:
    """Create ``out``, or empty it if it holds a previous corpus; CorpusError if it holds anything else."""
    if out.exists() and not out.is_dir():
        raise CorpusError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        # Only a previous corpus (it has our manifest) may be replaced; anything
        # else in the folder is the user's and is left alone.
        manifests = [out / name for name in (MANIFEST_NAME, _OLD_MANIFEST_NAME) if (out / name).is_file()]
        if not manifests:
            raise CorpusError(f"{out}: directory is not empty and holds no corpus manifest ({MANIFEST_NAME})")
        for child in SPLITS:
            if (out / child).is_dir():
                shutil.rmtree(out / child)
        for manifest in manifests:
            manifest.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_manifest(out: Path, manifest: dict) -> None:
    """Write ``out/.manifest.json`` atomically, after every record file."""
    text = json.dumps(manifest, indent=1) + "\n"
    # The temporary name is hidden too, so a crash never leaves a stray .json among the records.
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", newline="\n", dir=out, prefix=MANIFEST_NAME + ".", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, out / MANIFEST_NAME)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
