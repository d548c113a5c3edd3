"""Datasets into and JSON out of object storage, where nothing can be renamed.

`publish`: a local dataset folder -> a prefix. Object keys carry the file's sha256 (shards/shard-000003-
<sha16>.arrow), so an object is never overwritten with other bytes: a rerun uploads only shards whose bytes
changed, a crash at any moment leaves the previous index.json naming objects that are all still there, and
index.json, PUT last, is the commit point. Afterwards objects under the prefix that neither the new index nor
the one it replaced names (left by a crashed run, or two versions old) are deleted; readers never list the
prefix, so until then they are never read.

`mirror`: the JSON/JSONL objects under a prefix -> a local folder that `convert` reads (an object is fetched
again only when its size or modification time changed, so convert's own change detection keeps working).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path, PurePosixPath

from streamtrain.dataset import INDEX_FILE, REJECTS_FILE, Index, index_json, member_name, parse_index, read_index
from streamtrain.errors import DataError
from streamtrain.storage.location import Location
from streamtrain.storage.objects import delete, exists, get_bytes, get_file, list_objects, put_bytes, put_file

__all__ = ["publish", "mirror", "content_key", "read_remote_index"]


def content_key(name: str, sha256: str) -> str:
    """The object key of a dataset file: its name with the first 16 hex digits of its sha256 before the suffix."""
    p = PurePosixPath(name)
    tag = sha256[:16]
    if p.stem.endswith("-" + tag):
        return name
    return str(p.with_name(f"{p.stem}-{tag}{p.suffix}"))


def read_remote_index(where: Location) -> Index | None:
    """The prefix's index.json, parsed (None when there is none)."""
    if not exists(where, INDEX_FILE):
        return None
    return parse_index(get_bytes(where, INDEX_FILE), Path("."), where.child(INDEX_FILE).url)


def publish(local_root: str | os.PathLike, where: Location) -> dict:
    """Upload the dataset in `local_root` to `where`; {"uploaded": n, "reused": n, "deleted": n, "bytes": n}."""
    local_root = Path(local_root)
    index = read_index(local_root)
    old = read_remote_index(where)
    listed = list_objects(where)
    shards = []
    uploaded = reused = sent = 0
    for info in index.shards:
        key = content_key(info.file, info.sha256)
        if listed.get(key, (None,))[0] == info.bytes:
            reused += 1  # same name, so the same sha256 prefix, and the same size: these bytes are there
        else:
            put_file(where, key, local_root / info.file)
            uploaded += 1
            sent += info.bytes
        shards.append(dataclasses.replace(info, file=key))
    lengths_key = content_key(index.lengths_file, index.lengths_sha256) if index.lengths_sha256 else index.lengths_file
    put_file(where, lengths_key, local_root / index.lengths_file)
    if (local_root / REJECTS_FILE).is_file():
        put_file(where, REJECTS_FILE, local_root / REJECTS_FILE)
    remote = dataclasses.replace(index, shards=shards, lengths_file=lengths_key)
    put_bytes(where, INDEX_FILE, json.dumps(index_json(remote), indent=1).encode())  # the commit point
    keep = {INDEX_FILE, REJECTS_FILE, lengths_key, *(s.file for s in shards)}
    if old is not None:
        keep |= {old.lengths_file, *(s.file for s in old.shards)}
    deleted = 0
    for name in listed:
        if name not in keep and (name.startswith("shards/") or name.startswith("lengths")):
            delete(where, name)
            deleted += 1
    return {"uploaded": uploaded, "reused": reused, "deleted": deleted, "bytes": sent}


def mirror(where: Location, local_root: str | os.PathLike) -> Path:
    """Fetch the .json/.jsonl objects under `where` into `local_root` (keys become relative paths; hidden
    names are skipped as convert skips them); local files no longer under the prefix are removed."""
    local_root = Path(local_root)
    local_root.mkdir(parents=True, exist_ok=True)
    wanted = {}
    for name, (size, mtime) in list_objects(where).items():
        parts = name.split("/")
        if not name.lower().endswith((".json", ".jsonl")) or any(p.startswith(".") for p in parts):
            continue
        member_name(where.url, name, "object key")
        wanted[name] = (size, mtime)
    if not wanted:
        raise DataError(f"{where.url}: no .json or .jsonl objects under this prefix")
    for name, (size, mtime) in wanted.items():
        dest = local_root / name
        try:
            st = dest.stat()
            if st.st_size == size and abs(st.st_mtime - mtime) < 1e-3:
                continue
        except OSError:
            pass
        dest.parent.mkdir(parents=True, exist_ok=True)
        get_file(where, name, dest, size=size)
        os.utime(dest, (mtime, mtime))  # the object's time, so an unchanged object is not fetched again
    for path in sorted(local_root.rglob("*"), reverse=True):
        rel = path.relative_to(local_root).as_posix()
        if path.is_file() and rel not in wanted and not rel.startswith("."):
            path.unlink()
    return local_root
