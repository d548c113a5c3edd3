"""Parallel execution of a convert run: task specs for the groups to build, a process pool (or inline with one
worker), progress, merging of piece files into shards, and the per-group results that `commit` assembles.
A rejected record under --on-error fail stops the run with the first reason, before anything is committed.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamtrain import format as fmt
from streamtrain.convert.plan import _split_partials
from streamtrain.convert.tasks import (
    _merge_pieces,
    _run_task,
    _TaskResult,
    _TaskSpec,
    _worker_init,
)
from streamtrain.errors import DataError

__all__ = ["default_workers"]


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _shard_path(staging: Path, token: str, gi: int) -> str:
    """Where group `gi`'s new shard is written in the staging folder."""
    return str(staging / f"shard-{token}-{gi:06d}.arrow")


def _make_tasks(groups, build, dim, on_error, workers, staging: Path, token: str):
    """Task specs in group order, and for groups split over several tasks the ids of their piece tasks.
    With fewer groups than workers can share, a group's partials become separate tasks merged afterwards."""
    many_tasks = workers > 1 and len(build) < 2 * workers
    specs, pieces_of = [], {}
    backend = os.environ.get("STREAMTRAIN_JSON_BACKEND")
    for gi in build:
        g = groups[gi]
        final_path = _shard_path(staging, token, gi)
        partials = _split_partials(g) if many_tasks and g.cuts else None
        if partials and len(partials) > 1:
            ids = []
            for pi, partial in enumerate(partials):
                piece = str(staging / f"piece-{gi:06d}-{pi:06d}.pickle")
                ids.append(len(specs))
                specs.append(_TaskSpec(len(specs), gi, partial, [], dim, on_error, piece, False, backend))
            pieces_of[gi] = ids
        else:
            specs.append(_TaskSpec(len(specs), gi, g.segments, g.cuts, dim, on_error, final_path, True, backend))
    return specs, pieces_of


@dataclass
class _Built:
    stats: fmt.RunningStats
    lengths: np.ndarray
    rejects: list
    num_records: int
    num_fast: int
    shard_path: str | None
    shard_bytes: int = 0
    sha256: str = ""


def _execute(groups, build, dim, on_error, workers, staging, token, progress, total_bytes, num_files):
    specs, pieces_of = _make_tasks(groups, build, dim, on_error, workers, staging, token)
    crash_after = int(os.environ.get("STREAMTRAIN_TEST_CRASH_AFTER_SHARDS", "0") or 0)
    results: dict[int, _TaskResult] = {}
    merged: dict[int, tuple[int, str]] = {}
    shards_written = 0
    build_bytes = sum(groups[i].nominal_bytes for i in build)
    n_procs = min(workers, len(specs))
    sizes = {src.path: src.size for i in build for src, _, _ in groups[i].nominal}

    def on_result(r: _TaskResult) -> None:
        nonlocal shards_written
        results[r.task_id] = r
        if r.failed:
            raise _Abort()
        files = sum(1 for seg in specs[r.task_id].segments if seg[2] == sizes[seg[0]])
        progress.advance(r.parsed_bytes, r.num_records, files)
        if r.out_path and specs[r.task_id].final:
            shards_written += 1
            if crash_after and shards_written >= crash_after:
                os._exit(86)

    progress.start(build_bytes, num_files, total_bytes - build_bytes)
    try:
        if n_procs <= 1:
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                for spec in specs:
                    on_result(_run_task(spec))
                for gi, ids in pieces_of.items():
                    merged[gi] = _merge_one(results, ids, staging, token, gi, dim)
            finally:
                if was_enabled:
                    gc.enable()
        else:
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            # Workers are forked before any progress thread starts.
            with ctx.Pool(n_procs, initializer=_worker_init) as pool:
                pending_merges = {}
                # Largest tasks first, so the last ones to finish are small (results are keyed by task id,
                # so the order of execution changes nothing in the output).
                by_size = sorted(specs, key=lambda s: -sum(seg[2] - seg[1] for seg in s.segments))
                for r in pool.imap_unordered(_run_task, by_size):
                    on_result(r)
                    for gi, ids in pieces_of.items():
                        if gi not in pending_merges and all(i in results for i in ids):
                            paths = [results[i].out_path for i in ids if results[i].out_path]
                            out_path = _shard_path(staging, token, gi)
                            pending_merges[gi] = pool.apply_async(_merge_pieces, (paths, out_path, dim)) if paths else None
                for gi, job in pending_merges.items():
                    merged[gi] = (job.get(), _shard_path(staging, token, gi)) if job else None
    except _Abort:
        failed = [r for r in results.values() if r.rejects]
        failed.sort(key=lambda r: r.task_id)
        path, line, reason = failed[0].rejects[0]
        more = sum(len(r.rejects) for r in failed) - 1
        extra = f" ({more} more error{'s' if more != 1 else ''} seen)" if more else ""
        raise DataError(
            f"{path}:{line}: {reason}{extra}; no dataset written (--on-error skip keeps the valid records "
            "and lists every reject in rejects.jsonl)"
        ) from None

    built: dict[int, _Built] = {}
    for gi in build:
        ids = pieces_of.get(gi) or [s.task_id for s in specs if s.group == gi]
        rs = [results[i] for i in ids]
        stats = fmt.RunningStats(dim)
        for r in rs:
            for st in r.stats:
                stats.merge(st)
        b = _Built(
            stats,
            np.concatenate([r.lengths for r in rs]) if rs else np.zeros(0, np.int32),
            [rej for r in rs for rej in r.rejects],
            sum(r.num_records for r in rs),
            sum(r.num_fast for r in rs),
            None,
        )
        if gi in pieces_of:
            m = merged.get(gi)
            if m is not None:
                (b.shard_bytes, b.sha256), b.shard_path = m
        else:
            r = rs[0]
            b.shard_path, b.shard_bytes, b.sha256 = r.out_path, r.shard_bytes, r.sha256
        built[gi] = b
    return built


def _merge_one(results, ids, staging, token, gi, dim):
    paths = [results[i].out_path for i in ids if results[i].out_path]
    if not paths:
        return None
    out_path = _shard_path(staging, token, gi)
    return _merge_pieces(paths, out_path, dim), out_path


class _Abort(Exception):
    pass
