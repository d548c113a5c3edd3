"""index.json and the lengths file: parsing with a precise reason for every problem, writing (last,
atomically: it is the commit point), and the memory-mapped lengths of every sequence.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from streamtrain.dataset.io import atomic_write_json, map_file
from streamtrain.dataset.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    LENGTHS_FILE,
)
from streamtrain.errors import DataError

__all__ = ["ShardInfo", "Index", "is_dataset", "read_index", "parse_index", "member_name", "write_index", "index_json",
           "parse_lengths", "load_lengths"]


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the dataset folder, e.g. "shards/shard-000000.arrow"
    num_sequences: int
    num_tokens: int
    bytes: int
    sha256: str
    first_id: int  # global id of the shard's first row

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "first_id": self.first_id,
        }


@dataclass
class Index:
    """The parsed index.json of a dataset folder."""

    root: Path
    dim: int
    num_sequences: int
    num_tokens: int
    shards: list[ShardInfo]
    mean: np.ndarray  # (dim,) float64, over all tokens
    std: np.ndarray  # (dim,) float64, population std over all tokens
    lengths_file: str = LENGTHS_FILE
    lengths_sha256: str = ""
    num_rejected: int = 0
    extra: dict = field(default_factory=dict)  # every other key of index.json, kept as is

    @property
    def shard_offsets(self) -> np.ndarray:
        """(num_shards + 1,) int64: global id of each shard's first row, then num_sequences."""
        counts = np.array([s.num_sequences for s in self.shards], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)])

    def lengths(self) -> np.ndarray:
        return load_lengths(self)


_REQUIRED_KEYS = ("format", "format_version", "dim", "num_sequences", "num_tokens", "shards", "mean", "std")


def is_dataset(root: str | os.PathLike) -> bool:
    return (Path(root) / INDEX_FILE).is_file()


def read_index(root: str | os.PathLike) -> Index:
    """Parse DIR/index.json; raise DataError with the reason and the fix when it is not a usable dataset."""
    root = Path(root)
    path = root / INDEX_FILE
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not path.is_file():
        raise DataError(
            f"{root}: not a streamtrain dataset (no {INDEX_FILE}; create one with `streamtrain convert SRC --out {root}`)"
        )
    return parse_index(path.read_bytes(), root, path)


def parse_index(data: bytes, root: str | os.PathLike, path: str | os.PathLike) -> Index:
    """An Index from index.json's bytes (`path`: where they came from, for errors). Every value is checked:
    index.json is input like any other, local or downloaded."""
    root = Path(root)
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object")
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise DataError(f"{path}: missing keys {', '.join(missing)}")
    if raw["format"] != FORMAT_NAME:
        raise DataError(f"{path}: format is {raw['format']!r}, expected {FORMAT_NAME!r}")
    version = _typed(path, raw, "format_version", int)
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {version} is newer than this streamtrain reads "
            f"({FORMAT_VERSION}); upgrade streamtrain or re-convert"
        )
    dim = _typed(path, raw, "dim", int, minimum=1)
    if not isinstance(raw["shards"], list):
        raise DataError(f"{path}: key 'shards' must be a list, got {type(raw['shards']).__name__}")
    shards = []
    for i, s in enumerate(raw["shards"]):
        where = f"shards[{i}]"
        if not isinstance(s, dict):
            raise DataError(f"{path}: malformed shard entry {where} (expected an object)")
        missing = [k for k in ShardInfo.__dataclass_fields__ if k not in s]
        if missing:
            raise DataError(f"{path}: malformed shard entry {where} (missing {', '.join(missing)})")
        shards.append(ShardInfo(
            file=member_name(path, _typed(path, s, "file", str, where), f"{where}.file"),
            num_sequences=_typed(path, s, "num_sequences", int, where, minimum=0),
            num_tokens=_typed(path, s, "num_tokens", int, where, minimum=0),
            bytes=_typed(path, s, "bytes", int, where, minimum=0),
            sha256=_typed(path, s, "sha256", str, where),
            first_id=_typed(path, s, "first_id", int, where, minimum=0),
        ))
    known = set(_REQUIRED_KEYS) | {"lengths_file", "lengths_sha256", "num_rejected"}
    return Index(
        root=root,
        dim=dim,
        num_sequences=_typed(path, raw, "num_sequences", int, minimum=0),
        num_tokens=_typed(path, raw, "num_tokens", int, minimum=0),
        shards=shards,
        mean=_vector(path, raw, "mean", dim),
        std=_vector(path, raw, "std", dim),
        lengths_file=member_name(path, _typed(path, raw, "lengths_file", str, default=LENGTHS_FILE), "lengths_file"),
        lengths_sha256=_typed(path, raw, "lengths_sha256", str, default=""),
        num_rejected=_typed(path, raw, "num_rejected", int, minimum=0, default=0),
        extra={k: v for k, v in raw.items() if k not in known},
    )


_MISSING = object()


def member_name(path, name: str, key: str) -> str:
    """`name` from index.json if it is a plain relative path inside the dataset (no absolute path, no `..`,
    no scheme or drive, no backslash); else DataError, before anything is read or written through it."""
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or ":" in name or "\x00" in name
            or any(part in ("", ".", "..") for part in parts)):
        raise DataError(f"{path}: key {key!r} is {name!r}, not a plain relative path inside the dataset; refusing it")
    return name


def _typed(path: Path, obj: dict, key: str, kind: type, where: str = "", minimum: int | None = None,
           default: Any = _MISSING) -> Any:
    """obj[key] checked to be a `kind` (bool is not an int), at least `minimum`; DataError naming the key."""
    name = f"{where}.{key}" if where else key
    if key not in obj and default is not _MISSING:
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{path}: key {name!r} must be {'an integer' if kind is int else 'a string'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise DataError(f"{path}: key {name!r} must be >= {minimum}, got {value!r}")
    return value


def _vector(path: Path, obj: dict, key: str, dim: int) -> np.ndarray:
    value = obj[key]
    if (not isinstance(value, list) or len(value) != dim
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise DataError(f"{path}: key {key!r} must be a list of {dim} numbers (dim)")
    return np.asarray(value, dtype=np.float64)


def write_index(index: Index) -> None:
    """Write DIR/index.json atomically. Call it last: it is what makes the folder a dataset."""
    atomic_write_json(Path(index.root) / INDEX_FILE, index_json(index))


def index_json(index: Index) -> dict:
    """index.json's object for `index`."""
    obj = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dim": index.dim,
        "num_sequences": index.num_sequences,
        "num_tokens": index.num_tokens,
        "mean": [float(v) for v in index.mean],
        "std": [float(v) for v in index.std],
        "lengths_file": index.lengths_file,
        "lengths_sha256": index.lengths_sha256,
        "num_rejected": index.num_rejected,
        "shards": [s.to_json() for s in index.shards],
    }
    obj.update(index.extra)
    return obj


def parse_lengths(buffer: pa.Buffer, path: str | os.PathLike, num_sequences: int) -> np.ndarray:
    """The lengths in a mapped .npy lengths file: a read-only view into `buffer` (no copy), checked to hold
    `num_sequences` integers."""
    try:
        header = io.BytesIO(memoryview(buffer)[: 1 << 16])
        version = np.lib.format.read_magic(header)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(header)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(header)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as e:
        raise DataError(f"{path}: lengths file is corrupt ({e})") from None
    if dtype.kind not in "iu" or len(shape) != 1:
        raise DataError(f"{path}: lengths file is corrupt (expected a 1-d integer array, got {dtype} {shape})")
    offset = header.tell()
    if offset + shape[0] * dtype.itemsize > buffer.size:
        raise DataError(f"{path}: lengths file is truncated ({buffer.size} bytes for {shape[0]} lengths)")
    if shape[0] != num_sequences:
        raise DataError(f"{path}: holds {shape[0]} lengths, index.json says {num_sequences}")
    return np.frombuffer(buffer, dtype=dtype, count=shape[0], offset=offset)


def load_lengths(index: Index) -> np.ndarray:
    """(num_sequences,) lengths in global id order, memory-mapped (read-only, no copy): no shard is opened."""
    path = Path(index.root) / index.lengths_file
    buffer, _ = map_file(path, "lengths")
    return parse_lengths(buffer, path, index.num_sequences)
