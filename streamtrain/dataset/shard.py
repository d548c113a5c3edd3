"""One shard file: reading a mapped shard as an Arrow table (no copy) and writing one atomically."""

from __future__ import annotations

import os
from typing import BinaryIO

import pyarrow as pa

from streamtrain.dataset.io import (
    atomic_write_with,
    file_sha256,
    map_file,
    naming_full_disk,
)
from streamtrain.errors import DataError

__all__ = ["read_shard", "open_shard", "write_shard"]


def read_shard(buffer: pa.Buffer, path: str | os.PathLike) -> pa.Table:
    """The Table of a mapped shard (Arrow IPC file); its buffers point into `buffer` (no copy)."""
    try:
        return pa.ipc.open_file(buffer).read_all()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise DataError(f"{path}: shard is unreadable or truncated ({e})") from None


def open_shard(path: str | os.PathLike) -> pa.Table:
    """Memory-map one shard and return it as a Table whose buffers point into the map (no copy)."""
    buffer, _ = map_file(path)
    return read_shard(buffer, path)


def write_shard(path: str | os.PathLike, table: pa.Table) -> tuple[int, str]:
    """Write `table` as an Arrow IPC file at `path` atomically (`atomic_write_with`); return (bytes, sha256).
    A full disk is a UserError naming `path` (`naming_full_disk`)."""

    def write(f: BinaryIO) -> None:
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)

    with naming_full_disk(path):
        atomic_write_with(path, write)
    return os.path.getsize(path), file_sha256(path)
