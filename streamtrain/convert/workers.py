"""Parallel execution of a convert run: task specs for the groups to build, the worker processes (`pool`; or
inline with one worker), progress, merging of piece files into shards, and the per-group results that `commit` assembles.
A rejected record under --on-error fail stops the run with the first reason, before anything is committed.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamtrain import dataset
from streamtrain.convert.plan import split_partials
from streamtrain.convert.pool import ProcessPool, WorkerLost
from streamtrain.convert.tasks import (
    TaskResult,
    TaskSpec,
    merge_pieces,
    run_task,
    worker_init,
)
from streamtrain.errors import DataError, UserError

__all__ = ["default_workers", "execute"]


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
        partials = split_partials(g) if many_tasks and g.cuts else None
        if partials and len(partials) > 1:
            ids = []
            for pi, partial in enumerate(partials):
                piece = str(staging / f"piece-{gi:06d}-{pi:06d}.pickle")
                ids.append(len(specs))
                specs.append(TaskSpec(len(specs), gi, partial, [], dim, on_error, piece, False, backend))
            pieces_of[gi] = ids
        else:
            specs.append(TaskSpec(len(specs), gi, g.segments, g.cuts, dim, on_error, final_path, True, backend))
    return specs, pieces_of


@dataclass
class _Built:
    stats: dataset.RunningStats
    lengths: np.ndarray
    rejects: list
    num_records: int
    num_fast: int
    shard_path: str | None
    shard_bytes: int = 0
    sha256: str = ""


def execute(groups, build, dim, on_error, workers, staging, token, progress, total_bytes, num_files):
    specs, pieces_of = _make_tasks(groups, build, dim, on_error, workers, staging, token)
    crash_after = int(os.environ.get("STREAMTRAIN_TEST_CRASH_AFTER_SHARDS", "0") or 0)
    results: dict[int, TaskResult] = {}
    merged: dict[int, tuple[int, str]] = {}
    failed: list[int] = []  # task ids of tasks that hit a reject under --on-error fail
    shards_written = 0
    build_bytes = sum(groups[i].nominal_bytes for i in build)
    n_procs = min(workers, len(specs))
    sizes = {src.path: src.size for i in build for src, _, _ in groups[i].nominal}

    def on_result(r: TaskResult) -> None:
        nonlocal shards_written
        results[r.task_id] = r
        if r.failed:
            failed.append(r.task_id)
            return
        files = sum(1 for seg in specs[r.task_id].segments if seg[2] == sizes[seg[0]])
        progress.advance(r.parsed_bytes, r.num_records, files)
        if r.out_path and specs[r.task_id].final:
            shards_written += 1
            if crash_after and shards_written >= crash_after:
                os._exit(86)
            if shards_written == 1:
                _pause_point("staging")

    def first_failure_known() -> bool:
        # Task ids follow input order and a failed task stops at its first reject, so once every task before
        # the earliest failed one has finished, that task's reject is the first bad record of the run,
        # whatever the number of workers or the order in which tasks finish.
        return bool(failed) and all(i in results for i in range(min(failed)))

    if n_procs <= 1:
        progress.start(build_bytes, num_files, total_bytes - build_bytes)
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for spec in specs:
                on_result(run_task(spec))
                if failed:
                    break
            else:
                for gi, ids in pieces_of.items():
                    job = _merge_job(results, ids, staging, token, gi)
                    merged[gi] = (merge_pieces(*job, dim), job[1]) if job else None
        finally:
            if was_enabled:
                gc.enable()
    else:
        # Every worker is forked here, before progress.start may start a thread (the CLI's bar refreshes
        # from one): a fork while another thread runs can deadlock the child.
        with ProcessPool(n_procs, initializer=worker_init) as pool:
            progress.start(build_bytes, num_files, total_bytes - build_bytes)
            # Largest tasks first, so the last ones to finish are small (results are keyed by task id,
            # so the order of execution changes nothing in the output).
            for spec in sorted(specs, key=lambda s: -sum(seg[2] - seg[1] for seg in s.segments)):
                pool.submit(_run_task_in_worker, spec, ("task", spec.task_id))
            merging = set()
            try:
                for (kind, key), r in pool.results():
                    if kind == "merge":
                        merged[key] = (r, _shard_path(staging, token, key))
                        continue
                    on_result(r)
                    if failed:
                        if first_failure_known():
                            break  # leaving the pool kills the tasks still running
                        continue
                    for gi, ids in pieces_of.items():
                        if gi not in merging and all(i in results for i in ids):
                            merging.add(gi)
                            job = _merge_job(results, ids, staging, token, gi)
                            if job:
                                pool.submit(_merge_in_worker, (*job, dim), ("merge", gi))
                            else:
                                merged[gi] = None
            except WorkerLost as e:
                raise UserError(_lost_message(e, groups, specs, pieces_of)) from None
    if failed:
        path, line, reason = results[min(failed)].rejects[0]
        raise DataError(
            f"{path}:{line}: {reason}; no dataset written (--on-error skip keeps the valid records "
            "and lists every reject in rejects.jsonl)"
        )

    built: dict[int, _Built] = {}
    for gi in build:
        ids = pieces_of.get(gi) or [s.task_id for s in specs if s.group == gi]
        rs = [results[i] for i in ids]
        stats = dataset.RunningStats(dim)
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


def _run_task_in_worker(spec: TaskSpec) -> TaskResult:
    """`run_task` in a worker process. Test hook: STREAMTRAIN_TEST_KILL_TASK=N makes the worker that starts
    task N kill itself with SIGKILL, as the OOM killer would."""
    if os.environ.get("STREAMTRAIN_TEST_KILL_TASK") == str(spec.task_id):
        os.kill(os.getpid(), signal.SIGKILL)
    return run_task(spec)


def _merge_in_worker(args: tuple) -> tuple[int, str]:
    return merge_pieces(*args)


def _describe_group(g) -> str:
    """The input of a group, for messages: its files, with the byte range where it holds part of one."""
    parts = [src.path if (s, e) == (0, src.size) else f"{src.path} bytes {s}-{e}" for src, s, e in g.nominal]
    shown = ", ".join(parts[:3])
    return shown + (f" and {len(parts) - 3} more files" if len(parts) > 3 else "")


def _lost_message(e: WorkerLost, groups, specs, pieces_of) -> str:
    """One line for a worker that died: what it held (a group, or one piece of a group), and how it died."""
    if e.tag is None:
        what = "while idle"
    else:
        kind, key = e.tag
        gi = specs[key].group if kind == "task" else key
        piece = ""
        if kind == "task" and gi in pieces_of:
            piece = f"piece {pieces_of[gi].index(key) + 1} of {len(pieces_of[gi])} of "
        elif kind == "merge":
            piece = "the merge of the pieces of "
        what = f"while converting {piece}group {gi + 1} of {len(groups)} ({_describe_group(groups[gi])})"
    hint = " (out of memory? try fewer --workers or a smaller --shard-mb)" if e.exitcode == -signal.SIGKILL else ""
    return f"a worker process (pid {e.pid}) {e.how} {what}; nothing was committed, the output folder is as it was{hint}"


def _merge_job(results, ids, staging, token, gi) -> tuple[list[str], str] | None:
    """Arguments of `merge_pieces` (piece files in order, shard path) for group `gi`; None if nothing was kept."""
    paths = [results[i].out_path for i in ids if results[i].out_path]
    return (paths, _shard_path(staging, token, gi)) if paths else None


def _pause_point(name: str) -> None:
    """Test hook: STREAMTRAIN_TEST_PAUSE_AT=name sleeps here (STREAMTRAIN_TEST_PAUSE_S, default 60 s), so a
    test can kill the process at a known moment (e.g. "staging": after the first shard is staged)."""
    if os.environ.get("STREAMTRAIN_TEST_PAUSE_AT") == name:
        time.sleep(float(os.environ.get("STREAMTRAIN_TEST_PAUSE_S", "60")))
