"""Object-store operations with bounded retries: get (to bytes or to a file, hashing on the way), put,
list, delete. A transient error (connection refused or reset, timeouts, throttling, 5xx) is retried with
exponential backoff and full jitter until `Location.retry_seconds` have passed; a permanent one (no such
object or bucket, access denied, a checksum mismatch) ends at once. Either way the error is a DataError
naming the object, with no credential in it.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

from streamtrain.errors import DataError
from streamtrain.storage.location import Location

__all__ = ["get_bytes", "get_file", "put_bytes", "put_file", "list_objects", "delete", "exists", "retrying",
           "is_permanent"]

T = TypeVar("T")
_CHUNK_BYTES = 8 << 20
_PERMANENT_MARKERS = ("ACCESS_DENIED", "HTTP status 403", "HTTP status 404", "NO_SUCH", "INVALID_ACCESS_KEY",
                      "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId", "AccessDenied", "NoSuchBucket",
                      "NoSuchKey", "InvalidBucketName")


def is_permanent(error: BaseException) -> bool:
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    return any(m in str(error) for m in _PERMANENT_MARKERS)


def _reason(error: BaseException, where: Location) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such object"
    text = where.redact(" ".join(str(error).split()))
    return text[:300]


def retrying(what: str, where: Location, call: Callable[[], T], *, sleep=time.sleep,
             clock=time.monotonic) -> T:
    """call(), retried on transient errors for at most where.retry_seconds; DataError naming `what` else."""
    deadline = clock() + where.retry_seconds
    attempt = 0
    while True:
        try:
            return call()
        except DataError:
            raise
        except (OSError, ConnectionError, TimeoutError) as e:
            if is_permanent(e):
                raise DataError(f"{what}: {_reason(e, where)}") from None
            attempt += 1
            left = deadline - clock()
            if left <= 0:
                raise DataError(f"{what}: storage unreachable for {where.retry_seconds:g} s after {attempt} tries "
                                f"({_reason(e, where)})") from None
            # full jitter: many ranks retrying one server do not retry in step
            sleep(min(left, random.uniform(0, min(8.0, 0.25 * 2 ** attempt))))


def exists(where: Location, name: str) -> bool:
    import pyarrow.fs as pafs

    info = retrying(where.child(name).url, where, lambda: where.filesystem().get_file_info(where.key(name)))
    return info.type == pafs.FileType.File


def get_bytes(where: Location, name: str) -> bytes:
    def call() -> bytes:
        with where.filesystem().open_input_stream(where.key(name)) as f:
            return f.read()

    return retrying(where.child(name).url, where, call)


def get_file(where: Location, name: str, dest: Path, *, size: int | None = None,
             sha256: str | None = None) -> None:
    """Download `name` into `dest` atomically (temp file in dest's folder, fsync, rename), checking its size
    and sha256 on the way; a mismatch is permanent (the object is not what index.json says)."""
    url = where.child(name).url

    def call() -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".download", dir=dest.parent)
        try:
            digest = hashlib.sha256()
            got = 0
            with os.fdopen(fd, "wb") as out, where.filesystem().open_input_stream(where.key(name)) as src:
                while True:
                    chunk = src.read(_CHUNK_BYTES)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if size is not None and got != size:
                raise DataError(f"{url}: {got} bytes, index.json says {size} (truncated or replaced object)")
            if sha256 is not None and digest.hexdigest() != sha256:
                raise DataError(f"{url}: checksum mismatch (sha256 differs from index.json): the object changed "
                                "after it was written; convert the dataset again")
            os.replace(tmp, dest)
            tmp = None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    retrying(url, where, call)


def put_bytes(where: Location, name: str, data: bytes) -> None:
    def call() -> None:
        with where.filesystem().open_output_stream(where.key(name)) as f:
            f.write(data)

    retrying(where.child(name).url, where, call)


def put_file(where: Location, name: str, src: Path) -> None:
    def call() -> None:
        with open(src, "rb") as inp, where.filesystem().open_output_stream(where.key(name)) as out:
            while True:
                chunk = inp.read(_CHUNK_BYTES)
                if not chunk:
                    break
                out.write(chunk)

    retrying(where.child(name).url, where, call)


def list_objects(where: Location) -> dict[str, tuple[int, float]]:
    """{name relative to the prefix: (size, mtime in s)} of every object under it (none: {})."""
    import pyarrow.fs as pafs

    def call():
        selector = pafs.FileSelector(where.fs_path, recursive=True, allow_not_found=True)
        return where.filesystem().get_file_info(selector)

    base = where.fs_path.rstrip("/") + "/"
    out = {}
    for info in retrying(where.url, where, call):
        if info.type == pafs.FileType.File and info.path.startswith(base):
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            out[info.path[len(base):]] = (int(info.size), mtime)
    return out


def delete(where: Location, name: str) -> None:
    def call() -> None:
        try:
            where.filesystem().delete_file(where.key(name))
        except FileNotFoundError:
            pass

    retrying(where.child(name).url, where, call)
