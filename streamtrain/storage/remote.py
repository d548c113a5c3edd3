"""What the commands do with a URL where a dataset path goes: read its index through the cache, summarize
and verify it, and the local folders (under the cache folder) that convert writes into or reads from before
publishing to or after mirroring from a prefix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

from streamtrain.dataset import Index, read_index
from streamtrain.errors import DataError
from streamtrain.storage.cache import ShardCache, default_cache_dir
from streamtrain.storage.location import Location, is_remote
from streamtrain.storage.objects import get_file

__all__ = ["open_index", "local_folder", "remote_summary", "verify_remote"]


def open_index(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Index:
    """The Index of a dataset folder, or of a dataset URL (index.json and lengths fetched into the cache)."""
    if is_remote(str(path)):
        return ShardCache(Location.of(str(path)), cache_dir).sync()
    return read_index(path)


def local_folder(cache_dir: str | os.PathLike | None, kind: str, url: str) -> Path:
    """cache_dir/kind/<hash of url>: where convert stages what it publishes to `url` ("out") or the JSON it
    mirrors from `url` ("mirror"). Kept between runs, so convert stays incremental."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / kind / hashlib.sha256(url.encode()).hexdigest()[:16]


def verify_remote(url: str, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """Download every shard of the dataset at `url` once (into a temporary file) and check its size and
    sha256 against index.json: the problems found, one line each, naming the object."""
    cache = ShardCache(Location.of(url), cache_dir)
    return _verify_shards(cache, cache.sync())  # sync checks the lengths file's sha256


def _verify_shards(cache: ShardCache, index: Index) -> list[str]:
    problems = []
    with tempfile.TemporaryDirectory(dir=cache.root) as tmp:
        for info in index.shards:
            dest = Path(tmp) / "shard"
            try:
                get_file(cache.where, info.file, dest, size=info.bytes, sha256=info.sha256)
            except DataError as e:
                problems.append(str(e))
            dest.unlink(missing_ok=True)
    return problems


def remote_summary(url: str, verify: bool, cache_dir: str | os.PathLike | None = None):
    from streamtrain.dataset.summary import summarize

    cache = ShardCache(Location.of(url), cache_dir)
    index = cache.sync()
    summary = summarize(cache.root, verify=False)
    return dataclasses.replace(summary, root=url, rejects_file=None,
                               problems=_verify_shards(cache, index) if verify else None)
