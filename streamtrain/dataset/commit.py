"""The commit protocol of every writer of a dataset folder (convert, DatasetWriter); the old dataset
stays usable at every instant:
  1. take DIR/.convert.lock (`DatasetLock`): one writer at a time; delete what a crashed writer left
     (`collect_leftovers` with the current index);
  2. write every new shard into a staging folder DIR/.staging-<token>/ (`staging_folder`);
  3. move the new shards into DIR/shards/ under names the current index does not name (`install_shards`);
  4. write the side files (the lengths file under a name the current index does not name) atomically;
  5. write index.json atomically (`write_index`): the single commit point;
  6. delete what the new index no longer names, and the staging folder (`collect_leftovers`).
A crash before 5 leaves the old dataset untouched; a crash after 5 leaves the new one complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from streamtrain.dataset.index import Index
from streamtrain.dataset.io import fsync_dir, naming_full_disk
from streamtrain.dataset.schema import SHARD_DIR
from streamtrain.errors import UserError

__all__ = ["LOCK_FILE", "STAGING_PREFIX", "DatasetLock", "new_token", "staging_folder", "install_shards",
           "referenced_files", "is_dataset_file", "collect_leftovers"]

LOCK_FILE = ".convert.lock"
STAGING_PREFIX = ".staging-"

# Files of the format at the top of a dataset folder that are leftovers unless index.json names them:
# lengths files and the temp files of atomic writes.
_FORMAT_TOP_FILES = re.compile(r"^(lengths.*\.npy|\.(index\.json|rejects\.jsonl|lengths.*\.npy)\..*\.tmp)$")
_FORMAT_FIXED_NAMES = re.compile(rf"^({SHARD_DIR}|index\.json|rejects\.jsonl|{re.escape(LOCK_FILE)}|{re.escape(STAGING_PREFIX)}.*)$")


class DatasetLock:
    """An exclusive lock on a dataset folder (flock on DIR/.convert.lock), held from `__enter__` to
    `__exit__`; UserError when another process holds it. The kernel drops it when the holder dies."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "DatasetLock":
        with naming_full_disk(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{self.path.parent}: another streamtrain process (convert, or a dataset writer) is writing this "
                "folder; wait for it to finish"
            ) from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def new_token() -> str:
    """A random token for the names of one writer's new files: no earlier writer used it."""
    return secrets.token_hex(4)


@contextlib.contextmanager
def staging_folder(root: str | os.PathLike, token: str) -> Iterator[Path]:
    """DIR/.staging-<token>/, created for the new shards of one write and deleted when the block ends (what
    was moved out of it stays)."""
    folder = Path(root) / f"{STAGING_PREFIX}{token}"
    with naming_full_disk(folder):
        folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def install_shards(root: str | os.PathLike, moves: Iterable[tuple[str | os.PathLike, str]]) -> None:
    """Move staged shard files into the dataset (`moves`: (staged path, name relative to `root`)) and make
    the renames durable. The names must be ones the current index does not name."""
    root = Path(root)
    with naming_full_disk(root / SHARD_DIR):
        (root / SHARD_DIR).mkdir(exist_ok=True)
    folders = set()
    for staged, name in moves:
        with naming_full_disk(root / name):
            os.replace(staged, root / name)
        folders.add((root / name).parent)
    for folder in folders:
        fsync_dir(folder)


def referenced_files(index: Index | None) -> set[str]:
    """Names (relative to the dataset folder) of the files that `index` needs: its shards and lengths file."""
    if index is None:
        return set()
    return {s.file for s in index.shards} | {index.lengths_file}


def is_dataset_file(name: str) -> bool:
    """Whether `name`, at the top of a folder, is one of the names a dataset writer puts there."""
    return bool(_FORMAT_FIXED_NAMES.match(name) or _FORMAT_TOP_FILES.match(name))


def collect_leftovers(root: str | os.PathLike, index: Index | None, keep: Iterable[str] = (),
                      own_files: re.Pattern | None = None) -> None:
    """Delete what a crashed or superseded writer left in `root`: staging folders and, given the current
    `index`, the shards, lengths files and temp files it does not name (nor `keep`), and the top-level files
    matching `own_files` (a writer's own side files) that neither names. Without a readable index only
    staging folders go: what else is a leftover is known once a new index is committed (an index.json this
    version cannot read may still name every file there)."""
    root = Path(root)
    names = referenced_files(index) | set(keep)
    for p in root.iterdir():
        name = p.name
        if name.startswith(STAGING_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif (index is not None and name not in names and p.is_file()
              and (_FORMAT_TOP_FILES.match(name) or (own_files is not None and own_files.match(name)))):
            p.unlink(missing_ok=True)
    shard_dir = root / SHARD_DIR
    if index is None or not shard_dir.is_dir():
        return
    for p in shard_dir.iterdir():
        if p.is_file() and f"{SHARD_DIR}/{p.name}" not in names and p.name.endswith((".arrow", ".tmp")):
            p.unlink(missing_ok=True)
