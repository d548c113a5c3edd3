"""Checksums of the files a process maps, hashed once per file version."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from streamtrain.dataset.index import Index, parse_lengths
from streamtrain.dataset.io import map_file
from streamtrain.errors import DataError
from streamtrain.user_cache import cache_dir

# `fit` and `eval` must not use a byte that differs from what index.json says (sha256, size), in any process
# that maps a shard: the main process and every DataLoader worker. Hashing every file in every process costs
# more than loading it (sha256 runs ~1.7 GB/s per core, the in-process loader copies ~4 GB/s of token bytes,
# and with 2 workers each worker maps every shard), so a file is hashed once per *version*, and that version
# is remembered:
#
# * A version is (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns), from fstat on the open file that is
#   hashed or mapped. Any write to the file moves its ctime, which no call can set back, and replacing it
#   gives a new inode, so a remembered version never covers bytes written after it was hashed.
# * A version is remembered in this process (forked DataLoader workers inherit it) and in a per-user record
#   cache shared by every process and run: `cache_dir()`/verified/, one small file per (device, inode),
#   replaced atomically. A missing, unreadable or odd record only means hashing again.
# * A version whose ctime is not yet older than the filesystem's timestamp granularity is not remembered: a
#   write within the same clock tick would leave ctime as it is.
#
# Where the hashing happens: `verify_files`, called by ShardStream when it is built (in the main process,
# before any worker starts), hashes every file without a record on a thread per core (hashlib releases the
# GIL). The workers, the next epoch's fresh workers and later runs then pay one fstat and a record lookup per
# file. Every process still checks each file it maps (`check_mapped`): a version that was not verified (the
# file changed since) is hashed from the map itself before any row of it is used. Hashing in the background
# while loading would hide little: a shuffled, length-bucketed batch takes rows from many shards, so the
# first batches already need most of them (benchmarks/bench_loader.py prints how many; there too the
# cost of verifying cold, warm and not at all, and of hashing per process at first map instead).

__all__ = [
    "FileVersion",
    "record_written",
    "ExpectedFile",
    "cache_dir",
    "check_size",
    "check_mapped",
    "verify_files",
    "verified_lengths",
    "index_files",
    "forget",
]

_RECORD_FORMAT = "streamtrain-verified-1"
_HASH_CHUNK_BYTES = 8 << 20
_MAX_HASH_THREADS = 8
# ctime comes from the kernel's coarse clock (a tick of at most 10 ms) on filesystems with sub-second
# timestamps, and is whole seconds (or two) on the others.
_FINE_GRANULARITY_NS = 100_000_000
_COARSE_GRANULARITY_NS = 2_000_000_000


class FileVersion(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> "FileVersion":
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)

    def settled(self, now_ns: int) -> bool:
        """Whether a write after `now_ns` must move ctime (see the module docstring)."""
        coarse = self.ctime_ns % 1_000_000_000 == 0
        return now_ns - self.ctime_ns > (_COARSE_GRANULARITY_NS if coarse else _FINE_GRANULARITY_NS)

    def wait_until_settled(self) -> None:
        coarse = self.ctime_ns % 1_000_000_000 == 0
        due_ns = self.ctime_ns + (_COARSE_GRANULARITY_NS if coarse else _FINE_GRANULARITY_NS) + 1
        delay_s = (due_ns - time.time_ns()) / 1e9
        if 0 < delay_s <= _COARSE_GRANULARITY_NS / 1e9:  # not a ctime in the future (clock skew)
            time.sleep(delay_s)


class ExpectedFile(NamedTuple):
    """A file as index.json describes it; `size` None when the index gives none (the lengths file)."""

    path: Path
    sha256: str
    size: int | None
    kind: str  # "shard" or "lengths", for messages


# version -> sha256 of the versions this process hashed or found recorded
_verified: dict[FileVersion, str] = {}


def forget() -> None:
    """Forget what this process verified (the record cache stays): the next check reads records again."""
    _verified.clear()


def _record_path(version: FileVersion) -> Path | None:
    root = cache_dir()
    return None if root is None else root / "verified" / f"{version.dev:x}-{version.ino:x}"


def _record_text(version: FileVersion, sha256: str) -> str:
    return " ".join([_RECORD_FORMAT, *(str(v) for v in version), sha256]) + "\n"


def _recorded(version: FileVersion, sha256: str) -> bool:
    path = _record_path(version)
    if path is None:
        return False
    try:
        with open(path, "rb") as f:
            text = f.read(512).decode("ascii")
    except (OSError, UnicodeDecodeError):
        return False
    return text == _record_text(version, sha256)


def _write_record(version: FileVersion, sha256: str) -> None:
    """Replace the record of `version`'s inode atomically; any failure only costs a hash later. Not fsynced:
    a record lost or torn by a crash no longer matches (see `_recorded`), so it is hashed again."""
    path = _record_path(version)
    if path is None:
        return
    tmp = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(_record_text(version, sha256))
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _is_verified(version: FileVersion, sha256: str) -> bool:
    if _verified.get(version) == sha256:
        return True
    if _recorded(version, sha256):
        _verified[version] = sha256
        return True
    return False


def _remember(path: Path, version: FileVersion, sha256: str, hashed_from_ns: int) -> None:
    """Remember a version whose bytes, read from `hashed_from_ns` on, hashed to `sha256`, unless the path
    names another version by now or a write could have kept its ctime."""
    try:
        now = FileVersion.of(os.stat(path))
    except OSError:
        return
    if now == version and version.settled(hashed_from_ns):
        _verified[version] = sha256
        _write_record(version, sha256)


def _mismatch(path: Path, kind: str) -> DataError:
    where = "index.json's lengths_sha256" if kind == "lengths" else "index.json"
    return DataError(f"{path}: checksum mismatch (sha256 differs from {where}): the file changed after it was "
                     "written; re-convert the dataset")


def check_size(path: Path, size: int, expected: int, kind: str = "shard") -> None:
    if size != expected:
        raise DataError(f"{path}: {size} bytes, index.json says {expected} (truncated or replaced {kind})")


def check_mapped(path: Path, stat: os.stat_result, data: pa.Buffer, sha256: str, kind: str = "shard") -> None:
    """Raise DataError unless `data`, the bytes mapped from `path` (`stat`: fstat of the mapped file), has
    `sha256`. Hashes only a version not verified before, by this process or (per the records) any other."""
    version = FileVersion.of(stat)
    if _is_verified(version, sha256):
        return
    started_ns = time.time_ns()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise _mismatch(path, kind)
    _remember(path, version, sha256, started_ns)


def _hash_file(path: Path, kind: str) -> tuple[FileVersion, str, int]:
    """(version, sha256, when hashing started) of the file at `path`, hashed from one open file."""
    try:
        version = FileVersion.of(os.stat(path))
        version.wait_until_settled()  # a file written just now: hashed once, then remembered
        with open(path, "rb", buffering=0) as f:
            version = FileVersion.of(os.fstat(f.fileno()))
            started_ns = time.time_ns()
            h = hashlib.sha256()
            chunk = bytearray(min(_HASH_CHUNK_BYTES, max(version.size, 1)))
            view = memoryview(chunk)
            while n := f.readinto(chunk):
                h.update(view[:n])
    except FileNotFoundError:
        raise DataError(f"{path}: {kind} file is missing") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the {kind} file ({e})") from None
    return version, h.hexdigest(), started_ns


def verify_files(files: Sequence[ExpectedFile], threads: int | None = None) -> int:
    """Check every file's size and sha256 against the index, hashing (on up to `threads` threads, default
    one per core, at most 8) only those whose current version was not verified before; raise DataError
    naming the first bad file in `files` order. Returns the number of files hashed."""
    pending = []
    for expected in files:
        try:
            stat = os.stat(expected.path)
        except FileNotFoundError:
            raise DataError(f"{expected.path}: {expected.kind} file is missing") from None
        if expected.size is not None:
            check_size(expected.path, stat.st_size, expected.size, expected.kind)
        if not _is_verified(FileVersion.of(stat), expected.sha256):
            pending.append(expected)
    if not pending:
        return 0
    if threads is None:
        threads = min(len(os.sched_getaffinity(0)), _MAX_HASH_THREADS)
    pool = ThreadPoolExecutor(max(1, min(threads, len(pending))), thread_name_prefix="streamtrain-verify")
    try:
        futures = [pool.submit(_hash_file, e.path, e.kind) for e in pending]
        for expected, future in zip(pending, futures):
            version, digest, started_ns = future.result()
            if expected.size is not None:
                check_size(expected.path, version.size, expected.size, expected.kind)
            if digest != expected.sha256:
                raise _mismatch(expected.path, expected.kind)
            _remember(expected.path, version, digest, started_ns)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return len(pending)


def index_files(index: Index, shards: Sequence[int] | None = None) -> list[ExpectedFile]:
    """The lengths file (when index.json gives its sha256) and the shards numbered `shards` (default all)."""
    root = Path(index.root)
    files = []
    if index.lengths_sha256:
        files.append(ExpectedFile(root / index.lengths_file, index.lengths_sha256, None, "lengths"))
    numbers = range(len(index.shards)) if shards is None else shards
    for s in numbers:
        info = index.shards[s]
        files.append(ExpectedFile(root / info.file, info.sha256, info.bytes, "shard"))
    return files


def verified_lengths(index: Index) -> np.ndarray:
    """`format.load_lengths`, with the mapped file checked against index.json's lengths_sha256 (when given)."""
    path = Path(index.root) / index.lengths_file
    buffer, stat = map_file(path, "lengths")
    if index.lengths_sha256:
        check_mapped(path, stat, buffer, index.lengths_sha256, "lengths")
    return parse_lengths(buffer, path, index.num_sequences)


def record_written(path: str | os.PathLike, sha256: str) -> None:
    """Record the file at `path`, just written (and fsynced) by this process from bytes that hashed to
    `sha256` (a download checked on the way in), as verified: readers then map it without hashing again."""
    try:
        version = FileVersion.of(os.stat(path))
    except OSError:
        return
    _verified[version] = sha256
    _write_record(version, sha256)
