"""One conversion task, as run in a worker process (or inline with one worker): read a run of segments,
convert their records block by block, compute statistics per partial, and write the rows as a shard (with
its checksum) or as a piece file that `merge_pieces` later joins into the group's shard.

Statistics are computed per partial over a fixed chunking of its rows and merged in order, so a group's
statistics and shard are bit-identical whether one task converts the group or one task per partial does.
"""

from __future__ import annotations

import gc
import os
import pickle
from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

from streamtrain import dataset
from streamtrain.convert.blocks import (
    BLOCK_BYTES,
    Backend,
    BlockOut,
    convert_fast,
    document_records,
    parser_backend,
    records_into,
    reject_blank_file,
)
from streamtrain.convert.records import BOM, split_lines
from streamtrain.convert.sources import blank_file_size, read_range

__all__ = ["TaskSpec", "TaskResult", "run_task", "merge_pieces", "worker_init"]


# ---------------------------------------------------------------------------------------------------------
# Statistics per partial (deterministic: a fixed chunking of the partial's values)

_STATS_ROWS = 8192


def _values_stats(blocks: list, dim: int) -> dataset.RunningStats:
    """Statistics of the rows of `blocks` (float32 (n, dim) arrays, in order), computed over fixed chunks of
    _STATS_ROWS rows so the result depends only on the rows, not on how they were split into blocks."""
    stats = dataset.RunningStats(dim)
    pending, pending_rows = [], 0

    def flush() -> None:
        nonlocal pending, pending_rows
        chunk = (np.concatenate(pending) if len(pending) > 1 else pending[0]).astype(np.float64)
        # Chunks that fit in cache: two passes over each in float64 without a corpus-sized temporary.
        mean = chunk.mean(axis=0)
        centred = chunk - mean
        stats.merge(dataset.RunningStats(dim, len(chunk), mean, np.einsum("ij,ij->j", centred, centred)))
        pending, pending_rows = [], 0

    for arr in blocks:
        pos = 0
        while pos < len(arr):
            take = min(_STATS_ROWS - pending_rows, len(arr) - pos)
            pending.append(arr[pos:pos + take])
            pending_rows += take
            pos += take
            if pending_rows == _STATS_ROWS:
                flush()
    if pending_rows:
        flush()
    return stats


# ---------------------------------------------------------------------------------------------------------
# Tasks


@dataclass
class TaskSpec:
    task_id: int
    group: int
    segments: list  # list[plan.Segment]
    cuts: list  # [(segment index, nominal file offset)] partial cuts; offset None: cut before that segment
    dim: int
    on_error: str
    out_path: str
    final: bool  # write the group's shard (with checksum) rather than a piece for a later merge
    backend: str | None = None


@dataclass
class TaskResult:
    task_id: int
    group: int
    stats: list  # RunningStats per partial
    lengths: np.ndarray  # int32
    rejects: list  # (path, line, reason)
    num_records: int
    num_fast: int  # records converted by the block fast path
    parsed_bytes: int
    out_path: str | None  # None when nothing was kept
    shard_bytes: int = 0
    sha256: str = ""
    failed: bool = False


def worker_init() -> None:
    # The parsers create no reference cycles; the cyclic collector only costs time here.
    gc.disable()


class _TaskState:
    """What a task has produced so far; `partial` holds the blocks of the partial being filled."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.blocks, self.partial, self.lengths, self.lines, self.paths = [], [], [], [], []
        self.stats, self.rejects = [], []
        self.num_records = self.num_fast = 0

    def add(self, path: str | list, out: BlockOut) -> None:
        """Records of `out`, all from the file `path`, or (a list) from one file each, every one kept."""
        self.num_records += out.num_records
        self.num_fast += out.num_fast
        if isinstance(path, list):
            if out.rejects or len(path) != sum(len(x) for x in out.lengths):
                raise RuntimeError(f"a block of {len(path)} whole files gave {sum(len(x) for x in out.lengths)} "
                                   f"records and {len(out.rejects)} rejects; expected one record per file")
            self.paths.extend(path)
        else:
            self.rejects.extend((path, line, reason) for line, reason in out.rejects)
            self.paths.extend([path] * sum(len(x) for x in out.lengths))
        if out.values:
            self.partial.extend(out.values)
            self.lengths.extend(out.lengths)
            self.lines.extend(out.lines)

    def close_partial(self) -> None:
        self.stats.append(_values_stats(self.partial, self.dim))
        self.blocks.extend(self.partial)
        self.partial = []


def run_task(spec: TaskSpec) -> TaskResult:
    backend = parser_backend(spec.backend)
    dim, on_error = spec.dim, spec.on_error
    st = _TaskState(dim)
    parsed_bytes = 0
    ok = True
    docs, docs_bytes = [], 0  # consecutive whole .json files, converted together
    for i, (path, start, end, first_line, kind) in enumerate(spec.segments):
        seg_cuts = [off for j, off in spec.cuts if j == i]
        if docs and (None in seg_cuts or kind != "document"):
            ok = _documents_into(docs, dim, st, on_error, backend)
            docs, docs_bytes = [], 0
            if not ok:
                break
        if None in seg_cuts:
            st.close_partial()
        data = read_range(path, start, end)
        parsed_bytes += end - start
        if kind == "document":
            docs.append((path, data))
            docs_bytes += len(data)
            if docs_bytes >= BLOCK_BYTES:
                ok = _documents_into(docs, dim, st, on_error, backend)
                docs, docs_bytes = [], 0
            del data
        else:
            out = BlockOut()
            offs = [off - start for off in seg_cuts if off is not None]
            texts, lines, starts = split_lines(data, first_line, bom=start == 0, starts=bool(offs))
            blank_ok = True
            if start == 0 and not texts:
                # The start of a file holds no record: the whole file may be blank (a file split over
                # groups or partials is judged here, by the piece that holds its start).
                size = blank_file_size(path, end)
                if size is not None:
                    blank_ok = reject_blank_file(size, data.startswith(BOM), out, on_error)
            del data
            k0 = 0
            for rel in offs:
                # The partial ends before the first line that starts at or after the cut.
                line_at_cut = first_line + int(np.searchsorted(starts, max(rel, 0), side="left"))
                k = bisect_left(lines, line_at_cut, lo=k0)
                ok = records_into(texts[k0:k], lines[k0:k], dim, out, on_error, backend)
                st.add(path, out)
                out = BlockOut()
                k0 = k
                if not ok:
                    break
                st.close_partial()
            if ok:
                ok = records_into(texts[k0:], lines[k0:], dim, out, on_error, backend)
                st.add(path, out)
            ok = ok and blank_ok
        if not ok:
            break
    if ok and docs:
        ok = _documents_into(docs, dim, st, on_error, backend)
    if ok:
        st.close_partial()
    lengths = np.concatenate(st.lengths) if st.lengths else np.zeros(0, np.int64)
    result = TaskResult(
        spec.task_id, spec.group, st.stats, lengths.astype(np.int32), st.rejects, st.num_records, st.num_fast,
        parsed_bytes, None, failed=not ok,
    )
    if not ok or len(lengths) == 0:
        return result
    values = np.concatenate(st.blocks) if len(st.blocks) > 1 else st.blocks[0]
    st.blocks = []
    lines = np.concatenate(st.lines)
    result.out_path = spec.out_path
    if spec.final:
        table = dataset.sequences_to_table(values, lengths, st.paths, lines, dim)
        del values
        result.shard_bytes, result.sha256 = dataset.write_shard(spec.out_path, table)
    else:
        # A piece is read back only by merge_pieces, in this run: plain buffers, no Arrow to decode.
        with dataset.naming_full_disk(spec.out_path), open(spec.out_path, "wb") as f:
            pickle.dump((values, lengths, st.paths, lines), f, protocol=5)
    return result


def _documents_into(docs: list, dim: int, st: _TaskState, on_error: str, backend: Backend) -> bool:
    """Whole .json files [(path, text)], each one record at line 1 in the common case, converted as one block
    (so many small files cost one parse); when the block fails, file by file as `document_records` does."""
    texts = []
    for _, data in docs:
        data = data.removeprefix(BOM)
        if data[:1] not in (b"[", b"{"):
            break  # blank, indented or not a record: take the file-by-file path
        texts.append(data)
    else:
        out = BlockOut()
        if convert_fast(texts, [1] * len(texts), dim, out, backend):
            st.add([path for path, _ in docs], out)
            return True
    for path, data in docs:
        out = BlockOut()
        ok = document_records(data, dim, out, on_error, backend)
        st.add(path, out)
        if not ok:
            return False
    return True


def merge_pieces(piece_paths: list[str], out_path: str, dim: int) -> tuple[int, str]:
    """Concatenate piece files (in order) into one shard, built exactly as a single task would build it."""
    values, lengths, paths, lines = [], [], [], []
    for p in piece_paths:
        with open(p, "rb") as f:
            piece_values, piece_lengths, piece_paths_, piece_lines = pickle.load(f)
        values.append(piece_values)
        lengths.append(piece_lengths)
        paths.extend(piece_paths_)
        lines.append(piece_lines)
    table = dataset.sequences_to_table(
        np.concatenate(values).reshape(-1, dim), np.concatenate(lengths), paths, np.concatenate(lines), dim
    )
    del values
    result = dataset.write_shard(out_path, table)
    for p in piece_paths:
        os.unlink(p)
    return result
