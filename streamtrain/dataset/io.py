"""File I/O of dataset folders: atomic writes, folder fsync, checksums, read-only memory maps, .npy bytes,
and naming a full disk. Every other module of the package reads and writes through these.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa

from streamtrain.errors import DataError, UserError

__all__ = ["atomic_write_bytes", "atomic_write_with", "atomic_write_json", "fsync_dir", "file_sha256",
           "map_file", "npy_bytes", "DiskFullError", "naming_full_disk"]

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(f)` on a temp file in `path`'s folder, fsync, rename over `path`, fsync the folder: a crash
    or an exception at any point leaves the previous file intact (and no temp file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames and deletions in `folder` durable. Not every filesystem allows opening a folder,
    which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def map_file(path: str | os.PathLike, kind: str = "shard") -> tuple[pa.Buffer, os.stat_result]:
    """Memory-map the whole file at `path` read-only: (a buffer over the map, fstat of the file mapped).

    The file descriptor is closed before this returns. The map stays valid as long as the buffer or anything
    taken from it (Arrow slices, numpy views) is alive and is unmapped when the last one goes, so holding a
    map costs no file descriptor and a view can never outlive its map. `kind` names the file in errors.
    """
    try:
        source = pa.memory_map(str(path), "r")
    except FileNotFoundError:
        raise DataError(f"{path}: {kind} file is missing") from None
    except (pa.ArrowIOError, OSError) as e:
        raise DataError(f"{path}: cannot read the {kind} file ({e})") from None
    try:
        stat = os.fstat(source.fileno())
        buffer = source.read_buffer()
    finally:
        source.close()
    return buffer, stat


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file (the lengths file's format)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class DiskFullError(UserError):
    """A file could not be written: the disk is full or the quota is exhausted. The message names the file."""


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk or an exhausted quota (ENOSPC, EDQUOT) while writing `path` into a DiskFullError
    naming `path`: one line for the user instead of a traceback. Other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL_ERRNOS:
            raise
        raise DiskFullError(f"{path}: cannot write: the disk is full ({os.strerror(e.errno)})") from None
