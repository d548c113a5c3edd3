"""The on-disk dataset format: Arrow schema, file names, index.json, atomic writes, checksums.

A dataset is a folder::

    DIR/index.json          written last and atomically; a folder without it is not a dataset
    DIR/lengths*.npy        int32 length of every sequence, in global id order (memory-mappable);
                            index.json names the file (`lengths_file`)
    DIR/shards/shard-000000.arrow ...   Arrow IPC *file* format (memory-mappable, zero-copy reads)
    DIR/rejects.jsonl       one JSON object per rejected record, when anything was rejected

Each shard row is one sequence. Columns:

    sequence  large_list<fixed_size_list<float32, DIM>>   the vectors, (T, DIM) per row
    length    int32                                        T
    path      string                                       source file the record came from
    line      int64                                        1-based line (JSONL) or record index in that file

A sequence's global id is its position in the dataset: shard order, then row order.
Everything here imports pyarrow and numpy only (never torch).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamtrain.errors import DataError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "LENGTHS_FILE",
    "REJECTS_FILE",
    "SHARD_DIR",
    "ShardInfo",
    "Index",
    "shard_schema",
    "shard_name",
    "atomic_write_bytes",
    "atomic_write_with",
    "atomic_write_json",
    "file_sha256",
    "read_index",
    "write_index",
    "is_dataset",
    "map_file",
    "read_shard",
    "open_shard",
    "parse_lengths",
    "load_lengths",
    "verify_dataset",
    "RunningStats",
    "sequences_to_table",
    "write_shard",
    "DatasetWriter",
]

FORMAT_NAME = "streamtrain-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
LENGTHS_FILE = "lengths.npy"
REJECTS_FILE = "rejects.jsonl"
SHARD_DIR = "shards"


def shard_schema(dim: int) -> pa.Schema:
    """Arrow schema of every shard of a dataset of `dim`-wide vectors."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return pa.schema(
        [
            pa.field("sequence", pa.large_list(pa.list_(pa.float32(), dim)), nullable=False),
            pa.field("length", pa.int32(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("line", pa.int64(), nullable=False),
        ],
        metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "dim": str(dim)},
    )


def shard_name(number: int) -> str:
    """Relative path of shard `number` inside a dataset folder."""
    return f"{SHARD_DIR}/shard-{number:06d}.arrow"


# ---------------------------------------------------------------------------------------------------------
# Atomic writes: temp file in the same folder + fsync + rename, so a crash leaves the old file or the new one.


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
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a folder, which is harmless.
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


# ---------------------------------------------------------------------------------------------------------
# index.json


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
    try:
        raw = json.loads(path.read_bytes())
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
            file=_typed(path, s, "file", str, where),
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
        lengths_file=_typed(path, raw, "lengths_file", str, default=LENGTHS_FILE),
        lengths_sha256=_typed(path, raw, "lengths_sha256", str, default=""),
        num_rejected=_typed(path, raw, "num_rejected", int, minimum=0, default=0),
        extra={k: v for k, v in raw.items() if k not in known},
    )


_MISSING = object()


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
    atomic_write_json(Path(index.root) / INDEX_FILE, obj)


# ---------------------------------------------------------------------------------------------------------
# Reading


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


def verify_dataset(index: Index) -> list[str]:
    """Re-read and hash every byte of every file the index names, whatever was verified before; return one
    line per problem (empty: the dataset is intact)."""
    problems = []
    root = Path(index.root)
    try:
        lengths = load_lengths(index)  # its own problems are listed below
    except DataError:
        lengths = None
    for s in index.shards:
        path = root / s.file
        if not path.is_file():
            problems.append(f"{path}: shard file is missing")
            continue
        size = path.stat().st_size
        if size != s.bytes:
            problems.append(f"{path}: {size} bytes, index.json says {s.bytes}")
            continue
        if file_sha256(path) != s.sha256:
            problems.append(f"{path}: checksum mismatch (sha256 differs from index.json)")
            continue
        try:
            table = open_shard(path)
        except DataError as e:
            problems.append(str(e))
            continue
        tokens = int(pc.sum(table.column("length")).as_py() or 0)
        if table.num_rows != s.num_sequences or tokens != s.num_tokens:
            problems.append(
                f"{path}: {table.num_rows} sequences / {tokens} tokens, "
                f"index.json says {s.num_sequences} / {s.num_tokens}"
            )
        elif lengths is not None and s.num_sequences:
            stored = pc.list_value_length(table.column("sequence")).to_numpy()
            if not np.array_equal(stored, lengths[s.first_id : s.first_id + s.num_sequences]):
                problems.append(f"{path}: sequence lengths differ from {index.lengths_file}")
    lengths_path = root / index.lengths_file
    if not lengths_path.is_file():
        problems.append(f"{lengths_path}: lengths file is missing")
    elif index.lengths_sha256 and file_sha256(lengths_path) != index.lengths_sha256:
        problems.append(f"{lengths_path}: checksum mismatch (sha256 differs from index.json)")
    total = sum(s.num_sequences for s in index.shards)
    if total != index.num_sequences:
        problems.append(f"{root / INDEX_FILE}: shards hold {total} sequences, num_sequences says {index.num_sequences}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class RunningStats:
    """Per-dimension count / mean / M2 in float64, merged with Chan et al.'s parallel update, so that
    statistics of shards computed in separate processes combine exactly as if computed in one pass."""

    dim: int
    count: int = 0
    mean: np.ndarray = None  # type: ignore[assignment]
    m2: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.dim, dtype=np.float64)
        if self.m2 is None:
            self.m2 = np.zeros(self.dim, dtype=np.float64)

    def add_values(self, values: np.ndarray) -> None:
        """values: (N, dim) of any float dtype."""
        if len(values) == 0:
            return
        v = np.asarray(values, dtype=np.float64)
        mean = v.mean(axis=0)
        m2 = ((v - mean) ** 2).sum(axis=0)
        self.merge(RunningStats(self.dim, len(v), mean, m2))

    def merge(self, other: "RunningStats") -> None:
        if other.count == 0:
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        if self.count == 0:
            return np.zeros(self.dim, dtype=np.float64)
        return np.sqrt(np.maximum(self.m2 / self.count, 0.0))

    def to_json(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, obj: dict) -> "RunningStats":
        mean = np.asarray(obj["mean"], dtype=np.float64)
        return cls(len(mean), int(obj["count"]), mean, np.asarray(obj["m2"], dtype=np.float64))


def sequences_to_table(
    values: np.ndarray, lengths: np.ndarray, paths: list[str], lines: np.ndarray, dim: int
) -> pa.Table:
    """Build a shard table from concatenated vectors `values` (sum(lengths), dim) float32."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, dim)
    lengths = np.asarray(lengths, dtype=np.int64)
    assert values.shape[0] == int(lengths.sum()), "values and lengths disagree"
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa.float32()), dim)
    sequence = pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), vectors)
    return pa.Table.from_arrays(
        [
            sequence,
            pa.array(lengths.astype(np.int32), type=pa.int32()),
            pa.array(paths, type=pa.string()),
            pa.array(np.asarray(lines, dtype=np.int64), type=pa.int64()),
        ],
        schema=shard_schema(dim),
    )


def write_shard(path: str | os.PathLike, table: pa.Table) -> tuple[int, str]:
    """Write `table` as an Arrow IPC file at `path` atomically (`atomic_write_with`); return (bytes, sha256)."""

    def write(f: BinaryIO) -> None:
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)

    atomic_write_with(path, write)
    return os.path.getsize(path), file_sha256(path)


class DatasetWriter:
    """Write sequences into a new dataset folder; index.json is written last, on a clean exit only.

    >>> with DatasetWriter("shards", dim=28) as w:
    ...     w.add(np.zeros((5, 28), np.float32), path="a.jsonl", line=1)
    """

    def __init__(self, root: str | os.PathLike, dim: int, shard_bytes: int = 64 << 20, extra: dict | None = None):
        self.root = Path(root)
        self.dim = dim
        self.shard_bytes = shard_bytes
        self.extra = dict(extra or {})
        self.stats = RunningStats(dim)
        self.shards: list[ShardInfo] = []
        self.lengths: list[int] = []
        self._pending: list[tuple[np.ndarray, str, int]] = []
        self._pending_bytes = 0

    def __enter__(self) -> "DatasetWriter":
        (self.root / INDEX_FILE).unlink(missing_ok=True)  # the folder stops being a dataset until we finish
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        return self

    def add(self, sequence: np.ndarray, path: str = "", line: int = 0) -> None:
        seq = np.asarray(sequence, dtype=np.float32)
        if seq.ndim != 2 or seq.shape[1] != self.dim:
            raise ValueError(f"expected a (T, {self.dim}) array, got shape {seq.shape}")
        self._pending.append((seq, path, line))
        self._pending_bytes += seq.nbytes
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        seqs = [s for s, _, _ in self._pending]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        values = np.concatenate(seqs) if seqs else np.zeros((0, self.dim), np.float32)
        table = sequences_to_table(values, lengths, [p for _, p, _ in self._pending],
                                   np.array([ln for _, _, ln in self._pending]), self.dim)
        name = shard_name(len(self.shards))
        size, digest = write_shard(self.root / name, table)
        first_id = len(self.lengths)
        self.shards.append(ShardInfo(name, len(seqs), int(lengths.sum()), size, digest, first_id))
        self.lengths.extend(lengths.tolist())
        self.stats.add_values(values)
        self._pending.clear()
        self._pending_bytes = 0

    def close(self) -> Index:
        self._flush()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        buf = _npy_bytes(lengths)
        atomic_write_bytes(self.root / LENGTHS_FILE, buf)
        index = Index(
            root=self.root,
            dim=self.dim,
            num_sequences=len(lengths),
            num_tokens=int(lengths.sum(dtype=np.int64)),
            shards=self.shards,
            mean=self.stats.mean,
            std=self.stats.std,
            lengths_sha256=hashlib.sha256(buf).hexdigest(),
            extra={"stats": self.stats.to_json(), **self.extra},
        )
        write_index(index)
        return index

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
