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

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamtrain.errors import DataError, UserError

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
    "fsync_dir",
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
    "npy_bytes",
    "LOCK_FILE",
    "STAGING_PREFIX",
    "DatasetLock",
    "new_token",
    "staging_folder",
    "install_shards",
    "referenced_files",
    "collect_leftovers",
    "is_dataset_file",
    "DiskFullError",
    "naming_full_disk",
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
    """Build a shard table from concatenated vectors `values` (sum(lengths), dim) float32; ValueError when
    the pieces do not describe the same rows."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, dim)
    lengths = np.asarray(lengths, dtype=np.int64)
    lines = np.asarray(lines, dtype=np.int64)
    if values.shape[0] != int(lengths.sum()):
        raise ValueError(f"values and lengths disagree: {values.shape[0]} vectors, lengths sum to {int(lengths.sum())}")
    if len(paths) != len(lengths) or len(lines) != len(lengths):
        raise ValueError(f"{len(lengths)} lengths but {len(paths)} paths and {len(lines)} lines")
    if len(lengths) and lengths.min() < 0:
        raise ValueError("a sequence length is negative")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa.float32()), dim)
    sequence = pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), vectors)
    return pa.Table.from_arrays(
        [
            sequence,
            pa.array(lengths.astype(np.int32), type=pa.int32()),
            pa.array(paths, type=pa.string()),
            pa.array(lines, type=pa.int64()),
        ],
        schema=shard_schema(dim),
    )


def write_shard(path: str | os.PathLike, table: pa.Table) -> tuple[int, str]:
    """Write `table` as an Arrow IPC file at `path` atomically (`atomic_write_with`); return (bytes, sha256).
    A full disk is a UserError naming `path` (`naming_full_disk`)."""

    def write(f: BinaryIO) -> None:
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)

    with naming_full_disk(path):
        atomic_write_with(path, write)
    return os.path.getsize(path), file_sha256(path)


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file (the lengths file's format)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# The commit protocol, shared by every writer of a dataset folder (`streamtrain convert`, DatasetWriter).
#
# An earlier complete dataset in DIR stays usable at every instant:
#   1. take DIR/.convert.lock (`DatasetLock`): one writer at a time; delete what a crashed writer left
#      (`collect_leftovers` with the current index);
#   2. write every new shard into a staging folder DIR/.staging-<token>/ (`staging_folder`);
#   3. move the new shards into DIR/shards/ under names that the current index does not name, so no file it
#      names is ever overwritten, and fsync the folder (`install_shards`);
#   4. write the side files (the lengths file under a name the current index does not name) atomically;
#   5. write index.json atomically (`write_index`): the single commit point;
#   6. delete what the new index no longer names, and the staging folder (`collect_leftovers`).
# A crash before 5 leaves the old index.json and every file it names untouched (the new files are leftovers
# that the next writer deletes); a crash after 5 leaves the new dataset complete.

LOCK_FILE = ".convert.lock"
STAGING_PREFIX = ".staging-"

# Files of the format at the top of a dataset folder that are leftovers unless index.json names them:
# lengths files and the temp files of atomic writes.
_FORMAT_TOP_FILES = re.compile(r"^(lengths.*\.npy|\.(index\.json|rejects\.jsonl|lengths.*\.npy)\..*\.tmp)$")
_FORMAT_FIXED_NAMES = re.compile(rf"^({SHARD_DIR}|index\.json|rejects\.jsonl|{re.escape(LOCK_FILE)}|{re.escape(STAGING_PREFIX)}.*)$")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


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


def _current_index(root: Path) -> Index | None:
    try:
        return read_index(root) if is_dataset(root) else None
    except DataError:
        return None


class DatasetWriter:
    """Write sequences into a dataset folder, new or holding a dataset to replace, by the commit protocol
    above: the previous dataset stays usable until index.json is replaced, after a crash at any moment and
    after an exception inside the `with` block (then nothing of the new one is kept).

    >>> with DatasetWriter("shards", dim=28) as w:
    ...     w.add(np.zeros((5, 28), np.float32), path="a.jsonl", line=1)

    In a folder without a dataset the files get the plain names (`shards/shard-000000.arrow`,
    `lengths.npy`); replacing a dataset, they carry a fresh token (`shards/shard-<token>-000000.arrow`,
    `lengths-<token>.npy`), and the old files are deleted once the new index.json is in place.
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
        self._lock: DatasetLock | None = None
        self._staging: contextlib.ExitStack | None = None
        self._staging_dir: Path | None = None
        self._token = ""
        self._plain_names = False
        self._staged: list[tuple[Path, str]] = []  # (staged path, final name) of every shard written
        self._closed = False
        self._index: Index | None = None

    def __enter__(self) -> "DatasetWriter":
        self._begin()
        return self

    @contextlib.contextmanager
    def _keeping_previous(self) -> Iterator[None]:
        try:
            yield
        except DiskFullError as e:
            raise DiskFullError(f"{e}; nothing was written to {self.root}, its previous content is intact") from None

    def _begin(self) -> None:
        if self._lock is not None:
            return
        if self._closed:
            raise ValueError("this DatasetWriter is closed")
        with self._keeping_previous(), naming_full_disk(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        lock = DatasetLock(self.root)
        with self._keeping_previous():
            lock.__enter__()
        try:
            collect_leftovers(self.root, _current_index(self.root))
            self._token = new_token()
            # Plain names only where nothing can name them: no index.json, and no file of those names.
            self._plain_names = not (self.root / INDEX_FILE).exists() and not (self.root / LENGTHS_FILE).exists() \
                and not any((self.root / SHARD_DIR).glob("shard-[0-9]*.arrow"))
            stack = contextlib.ExitStack()
            with self._keeping_previous():
                self._staging_dir = stack.enter_context(staging_folder(self.root, self._token))
            self._staging = stack
        except BaseException:
            lock.__exit__(None, None, None)
            raise
        self._lock = lock

    def add(self, sequence: np.ndarray, path: str = "", line: int = 0) -> None:
        seq = np.asarray(sequence, dtype=np.float32)
        if seq.ndim != 2 or seq.shape[1] != self.dim:
            raise ValueError(f"expected a (T, {self.dim}) array, got shape {seq.shape}")
        self._begin()
        self._pending.append((seq, path, line))
        self._pending_bytes += seq.nbytes
        if self._pending_bytes >= self.shard_bytes:
            with self._keeping_previous():
                self._flush()

    def _shard_name(self, number: int) -> str:
        return shard_name(number) if self._plain_names else f"{SHARD_DIR}/shard-{self._token}-{number:06d}.arrow"

    def _flush(self) -> None:
        if not self._pending:
            return
        seqs = [s for s, _, _ in self._pending]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        values = np.concatenate(seqs) if seqs else np.zeros((0, self.dim), np.float32)
        table = sequences_to_table(values, lengths, [p for _, p, _ in self._pending],
                                   np.array([ln for _, _, ln in self._pending]), self.dim)
        name = self._shard_name(len(self.shards))
        staged = self._staging_dir / Path(name).name
        size, digest = write_shard(staged, table)
        self._staged.append((staged, name))
        first_id = len(self.lengths)
        self.shards.append(ShardInfo(name, len(seqs), int(lengths.sum()), size, digest, first_id))
        self.lengths.extend(lengths.tolist())
        self.stats.add_values(values)
        self._pending.clear()
        self._pending_bytes = 0

    def close(self) -> Index:
        """Commit: move the shards in, write the lengths file, then index.json; return the new Index."""
        self._begin()
        written: list[Path] = []  # files of the new dataset outside the staging folder, until it is committed
        try:
            with self._keeping_previous():
                self._commit(written)
        finally:
            for p in written:  # not committed: nothing names them
                p.unlink(missing_ok=True)
            self._end()
        return self._index

    def _commit(self, written: list[Path]) -> None:
        """Steps 3 to 6 of the protocol; `written` lists the new files outside the staging folder until
        index.json names them."""
        self._flush()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        buf = npy_bytes(lengths)
        written.extend(self.root / name for _, name in self._staged)
        install_shards(self.root, self._staged)
        lengths_file = LENGTHS_FILE if self._plain_names else f"lengths-{self._token}.npy"
        written.append(self.root / lengths_file)
        with naming_full_disk(self.root / lengths_file):
            atomic_write_bytes(self.root / lengths_file, buf)
        index = Index(
            root=self.root,
            dim=self.dim,
            num_sequences=len(lengths),
            num_tokens=int(lengths.sum(dtype=np.int64)),
            shards=self.shards,
            mean=self.stats.mean,
            std=self.stats.std,
            lengths_file=lengths_file,
            lengths_sha256=hashlib.sha256(buf).hexdigest(),
            extra={"stats": self.stats.to_json(), **self.extra},
        )
        with naming_full_disk(self.root / INDEX_FILE):
            write_index(index)
        written.clear()
        self._index = index
        collect_leftovers(self.root, index)

    def _end(self) -> None:
        self._closed = True
        self._pending.clear()
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._end()  # the previous dataset, if any, is left as it was
        elif not self._closed:
            self.close()
