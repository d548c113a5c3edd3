"""Work planning: which input bytes go into which shard (groups), how groups are cut for statistics and
parallel tasks (partials), and which groups a previous run already built (the reuse manifest).
"""

from __future__ import annotations

import hashlib
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import orjson

from streamtrain import dataset
from streamtrain.convert.sources import (
    Source,
    detect_dim,
    is_lines_document,
    reading_input,
)
from streamtrain.errors import DataError, UserError

# Work units. Input files, in sorted path order, are grouped into *groups* of about `shard_bytes` of input text
# (a file larger than that is split into several groups at line boundaries); each group becomes one shard and is
# the unit of reuse. Group boundaries depend only on file sizes and paths (plus a content-defined cut rule on
# the path hash, so that adding a file disturbs only its neighbours), never on `workers`. Each group is cut into
# *partials* of about `shard_bytes / 16` at line boundaries; statistics are computed per partial and merged in
# order, so the result is bit-identical whether a group is converted by one task or partial by partial in
# parallel (used when there are fewer than two groups per worker; each task writes its rows as a piece file
# in the staging folder) and then merged into the same shard.
#
# Reuse. A group's key hashes the conversion settings and the (path, size, mtime, inode, ctime, byte span)
# of its inputs; the
# manifest `sources-<token>.json` (written by `commit`) lists every group's key, shard, checksum, statistics and
# rejects, so an unchanged group is taken over without parsing it again.

__all__ = [
    "MANIFEST_FORMAT", "MANIFEST_VERSION", "Segment", "MIN_PARTIAL_BYTES", "load_previous", "plan_groups",
    "resolve_dim", "resolve_groups", "reusable_groups", "source_kinds", "split_partials",
]

MANIFEST_FORMAT = "streamtrain-convert-manifest"
MANIFEST_VERSION = 1

MIN_PARTIAL_BYTES = 256 << 10
_CDC_MASK = 7  # a file whose path hash has these bits clear may end a group early (content-defined cut)
_READ_BYTES = 8 << 20


# A segment: (path, start, end, first_line, kind) with kind "lines" or "document".
Segment = tuple


@dataclass
class _Group:
    nominal: list  # [(source, start, end)] nominal byte spans (range groups of big files use k*S .. (k+1)*S)
    key: str = ""
    segments: list = field(default_factory=list)  # actual Segments, resolved for groups that are built
    cuts: list = field(default_factory=list)  # partial cuts: [(segment index, nominal offset or None)]

    @property
    def nominal_bytes(self) -> int:
        return sum(e - s for _, s, e in self.nominal)


def _cdc_cut(path: str) -> bool:
    return (zlib.crc32(path.encode()) & _CDC_MASK) == 0


def plan_groups(sources: list[Source], shard_bytes: int, settings_key: str) -> list[_Group]:
    groups: list[_Group] = []
    current: list = []
    current_bytes = 0

    def close() -> None:
        nonlocal current, current_bytes
        if current:
            groups.append(_Group(current))
        current, current_bytes = [], 0

    for src in sources:
        splittable = src.kind == "lines" or (src.size > shard_bytes and is_lines_document(src))
        if src.size > shard_bytes and splittable:
            close()
            for k in range(math.ceil(src.size / shard_bytes)):
                groups.append(_Group([(src, k * shard_bytes, min((k + 1) * shard_bytes, src.size))]))
            continue
        current.append((src, 0, src.size))
        current_bytes += src.size
        if current_bytes >= shard_bytes or (current_bytes >= shard_bytes // 4 and _cdc_cut(src.path)):
            close()
    close()
    for g in groups:
        ident = [settings_key] + [[*src.fingerprint(), s, e] for src, s, e in g.nominal]
        g.key = hashlib.sha256(orjson.dumps(ident)).hexdigest()[:32]
    return groups


def source_kinds(groups: list[_Group], partial_bytes: int) -> dict[str, str]:
    """How each input file of `groups` is read: "lines" (split at line boundaries) or "document" (whole)."""
    kinds: dict[str, str] = {}
    for g in groups:
        for src, s, e in g.nominal:
            if src.path not in kinds:
                # A file split over several groups was found to be JSON Lines by `plan_groups`.
                split = (s, e) != (0, src.size)
                big_json = src.kind == "document" and src.size > partial_bytes and is_lines_document(src)
                kinds[src.path] = "lines" if src.kind == "lines" or split or big_json else "document"
    return kinds


def _resolve_cuts(path: str, size: int, offsets: Iterable[int]) -> dict[int, tuple[int, int]]:
    """For each nominal byte offset, the first line start at or after it and that line's 1-based number
    (offsets at or past the end map to (size, 0): no line number is needed there). One sequential read of
    the file up to the last offset before its end."""
    result: dict[int, tuple[int, int]] = {}
    with reading_input(path), open(path, "rb") as f:
        pos, line = 0, 1  # pos is a line start; line is its number
        for off in sorted(set(offsets)):
            if off <= 0:
                result[off] = (0, 1)
                continue
            if off >= size:
                result[off] = (size, 0)
                continue
            f.seek(off - 1)
            actual, probe = size, off - 1
            while chunk := f.read(1 << 16):
                i = chunk.find(b"\n")
                if i >= 0:
                    actual = probe + i + 1
                    break
                probe += len(chunk)
            f.seek(pos)
            remaining = actual - pos
            while remaining > 0:
                chunk = f.read(min(_READ_BYTES, remaining))
                if not chunk:
                    break
                line += chunk.count(b"\n")
                remaining -= len(chunk)
            pos = actual
            result[off] = (actual, line)
    return result


def resolve_groups(groups: list[_Group], partial_bytes: int, kinds: dict[str, str]) -> None:
    """Fill each group's line-aligned segments and its partial cuts (nominal offsets, resolved by whoever
    reads the text: the task itself, or `split_partials` when partials run as separate tasks)."""
    starts: dict[str, set] = {}
    for g in groups:
        for src, s, e in g.nominal:
            if kinds[src.path] == "lines":
                starts.setdefault(src.path, set()).update((s, e))
    sizes = {src.path: src.size for g in groups for src, _, _ in g.nominal}
    resolved = {path: _resolve_cuts(path, sizes[path], offs) for path, offs in starts.items()}
    for g in groups:
        g.segments, g.cuts = [], []
        offset = 0  # position in the group's nominal byte stream
        for i, (src, s, e) in enumerate(g.nominal):
            kind = kinds[src.path]
            p = (offset // partial_bytes + 1) * partial_bytes  # the next partial boundary in the stream
            if kind == "lines":
                (a, line), (b, _) = resolved[src.path][s], resolved[src.path][e]
                g.segments.append((src.path, a, b, line, kind))
                while p < offset + (e - s):
                    g.cuts.append((i, s + (p - offset)))
                    p += partial_bytes
            else:
                g.segments.append((src.path, 0, src.size, 1, kind))
                if p < offset + (e - s):
                    g.cuts.append((i + 1, None))  # a document is atomic: the cut moves to the next file
            offset += e - s
        g.cuts = [c for c in g.cuts if c[0] < len(g.segments)]


def split_partials(g: _Group) -> list[list]:
    """The group's partials as segment lists (reads the files to find line boundaries and numbers)."""
    offsets: dict[str, list] = {}
    for i, off in g.cuts:
        if off is not None:
            offsets.setdefault(g.segments[i][0], []).append(off)
    resolved = {}
    for path, offs in offsets.items():
        resolved[path] = _resolve_cuts(path, os.path.getsize(path), offs)
    partials: list[list] = [[]]
    for i, (path, a, b, line, kind) in enumerate(g.segments):
        for j, off in g.cuts:
            if j != i:
                continue
            if off is None:
                partials.append([])
                continue
            cut, cut_line = resolved[path][off]
            cut = min(max(cut, a), b)
            if cut > a:
                partials[-1].append((path, a, cut, line, kind))
                a, line = cut, cut_line
            partials.append([])
        if b > a or kind == "document":
            partials[-1].append((path, a, b, line, kind))
    return [p for p in partials if p]


# ---------------------------------------------------------------------------------------------------------
# Reuse: the previous run's state


def load_previous(out: Path, force: bool = False) -> tuple[dataset.Index | None, dict | None]:
    """The previous run's index and reuse manifest (None where absent or unusable). An index.json that
    cannot be read is an error unless `force`: rebuilding would replace a dataset that may be intact."""
    if not dataset.is_dataset(out):
        return None, None
    try:
        index = dataset.read_index(out)
    except DataError as e:
        if force:
            return None, None
        raise UserError(
            f"{out}: existing {dataset.INDEX_FILE} is unreadable ({e}); use --force to rebuild the dataset"
        ) from None
    info = index.extra.get("convert") or {}
    name = info.get("manifest")
    if not name:
        return index, None
    try:
        manifest = orjson.loads((out / name).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return index, None
    # A manifest is a cache: one that is damaged or disagrees with the index is not used (a full rebuild).
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or manifest.get("version") != MANIFEST_VERSION or not isinstance(manifest.get("groups"), list)
            or not isinstance(manifest.get("settings"), dict) or not _is_count(manifest["settings"].get("dim"), 1)
            or manifest["settings"]["dim"] != index.dim):
        return index, None
    return index, manifest


def _is_count(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_vector(value, dim: int) -> bool:
    return (isinstance(value, list) and len(value) == dim
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _entry_is_usable(g, dim: int) -> bool:
    """Whether a manifest group entry has every key, of the right type, that `commit` takes over."""
    if not isinstance(g, dict) or not isinstance(g.get("key"), str) or not _is_count(g.get("num_records")):
        return False
    shard = g.get("shard")
    if shard is not None and not (isinstance(shard, str) and isinstance(g.get("sha256"), str)):
        return False
    rejects = g.get("rejects")
    if not isinstance(rejects, list) or not all(
        isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and _is_count(r[1], 1) and isinstance(r[2], str)
        for r in rejects
    ):
        return False
    stats = g.get("stats")
    return (isinstance(stats, dict) and _is_count(stats.get("count")) and _is_vector(stats.get("mean"), dim)
            and _is_vector(stats.get("m2"), dim) and min(stats["m2"], default=0) >= 0)


def reusable_groups(out: Path, index: dataset.Index, manifest: dict) -> dict[str, dict]:
    """Groups of the previous run whose manifest entry is whole and agrees with the index, and whose shard is
    still what the index says (same file, size, checksum). Anything else is rebuilt."""
    shards = {s.file: s for s in index.shards}
    claimed = [g.get("shard") for g in manifest["groups"] if isinstance(g, dict)]
    lengths = None
    usable = {}
    for g in manifest["groups"]:
        if not _entry_is_usable(g, index.dim):
            continue
        shard = g["shard"]
        if shard is not None:
            info = shards.get(shard)
            path = out / shard
            if (info is None or info.sha256 != g["sha256"] or claimed.count(shard) != 1 or not path.is_file()
                    or path.stat().st_size != info.bytes):
                continue
            if lengths is None:
                try:
                    lengths = dataset.load_lengths(index)
                except DataError:
                    return {}
            group_lengths = np.asarray(lengths[info.first_id: info.first_id + info.num_sequences], dtype=np.int32)
            num_kept, num_tokens = info.num_sequences, info.num_tokens
            if len(group_lengths) != num_kept or int(group_lengths.sum(dtype=np.int64)) != num_tokens:
                continue
            g = dict(g, lengths=group_lengths, info=info)
        else:
            num_kept = num_tokens = 0
            g = dict(g, lengths=np.zeros(0, np.int32), info=None)
        # Counts that disagree would break kept + rejected == records seen, or the statistics.
        if g["num_records"] != num_kept + len(g["rejects"]) or g["stats"]["count"] != num_tokens:
            continue
        usable[g["key"]] = g
    return usable


def resolve_dim(src_list: list[Source], dim: int | None, manifest: dict | None) -> tuple[int, list | None]:
    if dim is not None:
        return dim, None
    if manifest is not None and manifest.get("dim_source"):
        # Reuse the detected width while every file up to the one it came from is unchanged (`load_previous`
        # checked that the recorded width is the previous dataset's).
        recorded = manifest["dim_source"]
        prefix = manifest.get("dim_prefix")
        if isinstance(prefix, list) and prefix and prefix[-1] == recorded:
            now = [s.fingerprint() for s in src_list[: len(prefix)]]
            if now == prefix:
                return manifest["settings"]["dim"], recorded
    found = detect_dim(src_list)
    if isinstance(found, str):
        raise DataError(
            f"no valid record in {len(src_list)} input file{'s' if len(src_list) != 1 else ''} to take --dim from "
            f"(first: {found}); a record is an array of at least 2 vectors of equal length. Run with "
            "--on-error skip --dim D to see every reject"
        )
    width, src = found
    return width, src.fingerprint()
