"""`convert()`: checks its arguments and runs the stages in order, under the dataset folder's lock:
sources → plan (and reuse) → workers → commit.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Sequence

import orjson

from streamtrain import dataset
from streamtrain.convert.commit import check_out_dir, collect_garbage, commit
from streamtrain.convert.plan import (
    MIN_PARTIAL_BYTES,
    load_previous,
    plan_groups,
    resolve_dim,
    resolve_groups,
    reusable_groups,
    source_kinds,
)
from streamtrain.convert.report import ConvertProgress, ConvertResult
from streamtrain.convert.sources import list_sources
from streamtrain.convert.workers import default_workers, execute
from streamtrain.errors import UserError

__all__ = ["ON_ERROR_CHOICES", "convert"]

ON_ERROR_CHOICES = ("fail", "skip")


def convert(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    on_error: str = "fail",
    dim: int | None = None,
    shard_mb: float = 64,
    force: bool = False,
    progress: ConvertProgress | None = None,
) -> ConvertResult:
    """Convert JSON/JSONL `sources` (files or folders) into the dataset folder `out`; see the package docstring."""
    t0 = time.perf_counter()
    progress = progress or ConvertProgress()
    if on_error not in ON_ERROR_CHOICES:
        raise UserError(f"--on-error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
    if dim is not None and dim < 1:
        raise UserError(f"--dim must be >= 1, got {dim}")
    if not (math.isfinite(shard_mb) and shard_mb > 0):
        raise UserError(f"--shard-mb must be a finite number > 0, got {shard_mb}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if not sources:
        raise UserError("no input given (pass one or more SRC files or folders)")
    out = Path(out)
    check_out_dir(out, force)
    src_list, num_ignored = list_sources(sources, exclude=out)
    if not src_list:
        raise UserError(
            f"no .json or .jsonl files in {', '.join(os.fspath(s) for s in sources)}"
            + (f" ({num_ignored} other files ignored)" if num_ignored else "")
        )
    shard_bytes = max(1, int(shard_mb * (1 << 20)))
    partial_bytes = max(MIN_PARTIAL_BYTES, shard_bytes // 16)
    try:
        return _convert_locked(src_list, num_ignored, out, workers, on_error, dim, shard_bytes, partial_bytes,
                               force, progress, t0)
    except dataset.DiskFullError as e:
        # Every write before index.json is staged or under a fresh name, and nothing is written after it.
        raise dataset.DiskFullError(f"{e}; nothing was committed, {out} is as it was") from None


def _convert_locked(src_list, num_ignored, out, workers, on_error, dim, shard_bytes, partial_bytes, force,
                    progress, t0) -> ConvertResult:
    with dataset.naming_full_disk(out):
        out.mkdir(parents=True, exist_ok=True)
    with dataset.DatasetLock(out):
        prev_index, manifest = load_previous(out, force)
        if force:
            manifest = None
        collect_garbage(out, prev_index)
        dim, dim_source = resolve_dim(src_list, dim, manifest)
        settings = {"dim": dim, "on_error": on_error, "shard_bytes": shard_bytes, "partial_bytes": partial_bytes}
        settings_key = orjson.dumps(settings).decode()
        groups = plan_groups(src_list, shard_bytes, settings_key)
        old_groups = {}
        if manifest is not None and manifest.get("settings") == settings and prev_index is not None:
            old_groups = reusable_groups(out, prev_index, manifest)
        build = [i for i, g in enumerate(groups) if g.key not in old_groups]
        todo = [groups[i] for i in build]
        resolve_groups(todo, partial_bytes, source_kinds(todo, partial_bytes))

        token = dataset.new_token()
        with dataset.staging_folder(out, token) as staging:
            built = execute(groups, build, dim, on_error, workers, staging, token, progress,
                            sum(g.nominal_bytes for g in groups), len(src_list))
            return commit(
                out, groups, build, built, old_groups, prev_index, settings, dim, dim_source, on_error,
                num_ignored, src_list, staging, token, t0, workers, progress,
            )
