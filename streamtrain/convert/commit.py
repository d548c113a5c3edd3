"""The dataset folder and the crash-safe commit of a convert run: the output folder check, leftovers of
earlier runs, moving new shards in, the lengths file, the reuse manifest, rejects.jsonl, and index.json
written last.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import numpy as np
import orjson

from streamtrain import dataset
from streamtrain.convert.blocks import parser_backend
from streamtrain.convert.plan import MANIFEST_FORMAT, MANIFEST_VERSION
from streamtrain.convert.report import ConvertResult
from streamtrain.errors import DataError, UserError

__all__ = ["LOCK_FILE", "STAGING_PREFIX", "check_out_dir", "collect_garbage", "commit"]

LOCK_FILE = dataset.LOCK_FILE
STAGING_PREFIX = dataset.STAGING_PREFIX

# convert's own side files at the top of a dataset folder: garbage unless index.json names them.
_MANIFEST_FILES = re.compile(r"^(sources-.*\.json|\.sources-.*\.json\..*\.tmp)$")


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if not out.exists() or dataset.is_dataset(out) or force:
        return
    strangers = [p.name for p in out.iterdir() if not (dataset.is_dataset_file(p.name) or _MANIFEST_FILES.match(p.name))]
    if strangers:
        raise UserError(
            f"{out}: folder is not empty and is not a streamtrain dataset (it holds {strangers[0]!r}); "
            "pick a new or empty folder for --out"
        )


def _manifest_of(index: dataset.Index | None) -> str | None:
    if index is None:
        return None
    info = index.extra.get("convert")
    name = info.get("manifest") if isinstance(info, dict) else None
    return name if isinstance(name, str) else None


def collect_garbage(out: Path, index: dataset.Index | None) -> None:
    """Delete what a crashed or superseded run left (`format.collect_leftovers`), reuse manifests included."""
    manifest = _manifest_of(index)
    dataset.collect_leftovers(out, index, keep=[manifest] if manifest else [], own_files=_MANIFEST_FILES)


def _crash_point(name: str) -> None:
    """Test hook: STREAMTRAIN_TEST_CRASH_AT=name kills the process here, as a power cut would."""
    if os.environ.get("STREAMTRAIN_TEST_CRASH_AT") == name:
        os._exit(86)


def _write(path: Path, data: bytes) -> None:
    with dataset.naming_full_disk(path):
        dataset.atomic_write_bytes(path, data)


def commit(out, groups, build, built, old_groups, prev_index, settings, dim, dim_source, on_error,
            num_ignored, src_list, staging, token, t0, workers, progress) -> ConvertResult:
    """
    Commit protocol: the one every dataset writer follows (`streamtrain.dataset.commit`), with the reuse
    manifest `sources-<token>.json` and `rejects.jsonl` among the side files of step 4:
      1. take `DIR/.convert.lock`: one writer at a time; delete leftovers of a crashed run
         (`DIR/.staging-*`, files that the current index.json does not name);
      2. write every new shard into `DIR/.staging-<token>/` (temp name + fsync + rename);
      3. move the new shards into `DIR/shards/` under names that contain the run's random token, so no file
         the current index names is ever overwritten; fsync the folder;
      4. write `lengths-<token>.npy` and the reuse manifest `sources-<token>.json` atomically, and
         `rejects.jsonl` into the staging folder;
      5. write `index.json` atomically (temp + fsync + rename): the single commit point; then move
         `rejects.jsonl` in (or delete the old one when nothing was rejected);
      6. delete what the new index no longer names (old shards, old lengths/manifest, the staging folder).
    A crash before 5 leaves the old index.json and every file it names untouched (new files are garbage that the
    next run deletes); a crash after 5 leaves the new dataset complete. `rejects.jsonl` is a report, not dataset
    content: just after 5 it may still describe the previous run (the next run rewrites it). On a validation
    failure (`--on-error fail`) or an error before 5 (a full disk) the new files are deleted and DIR is left as
    it was.
    """
    build_set = set(build)
    shards: list[dataset.ShardInfo] = []
    lengths_parts, rejects, manifest_groups = [], [], []
    stats = dataset.RunningStats(dim)
    num_records = 0
    moves = []  # (staged shard, its name in the dataset)
    first_id = 0
    for gi, g in enumerate(groups):
        if gi in build_set:
            b = built[gi]
            gstats, glengths, grejects, grecords = b.stats, b.lengths, b.rejects, b.num_records
            shard_file = sha = None
            if b.shard_path is not None:
                shard_file = f"{dataset.SHARD_DIR}/{Path(b.shard_path).name}"
                sha = b.sha256
                moves.append((b.shard_path, shard_file))
                shards.append(dataset.ShardInfo(shard_file, len(glengths), int(glengths.sum(dtype=np.int64)),
                                            b.shard_bytes, sha, first_id))
        else:
            old = old_groups[g.key]
            gstats = dataset.RunningStats.from_json(old["stats"]) if old["stats"]["count"] else dataset.RunningStats(dim)
            glengths = old["lengths"]
            grejects = [tuple(r) for r in old["rejects"]]
            grecords = old["num_records"]
            shard_file, sha = old["shard"], old.get("sha256")
            if old["info"] is not None:
                i = old["info"]
                shards.append(dataset.ShardInfo(i.file, i.num_sequences, i.num_tokens, i.bytes, i.sha256, first_id))
        first_id += len(glengths)
        stats.merge(gstats)
        lengths_parts.append(glengths)
        rejects.extend(grejects)
        num_records += grecords
        manifest_groups.append({
            "key": g.key,
            "sources": [[*src.fingerprint(), s, e] for src, s, e in g.nominal],
            "shard": shard_file,
            "sha256": sha,
            "num_records": grecords,
            "stats": gstats.to_json(),
            "rejects": [list(r) for r in grejects],
        })
    lengths = np.concatenate(lengths_parts).astype(np.int32) if lengths_parts else np.zeros(0, np.int32)
    if len(lengths) == 0:
        first = f" (first: {rejects[0][0]}:{rejects[0][1]}: {rejects[0][2]})" if rejects else ""
        raise DataError(f"no valid records: {num_records} seen, {len(rejects)} rejected{first}")

    progress.stage("committing")
    lengths_buf = dataset.npy_bytes(lengths)
    lengths_file = f"lengths-{token}.npy"
    manifest_file = f"sources-{token}.json"
    dim_prefix = None
    if dim_source is not None:
        names = [s.fingerprint() for s in src_list]
        dim_prefix = names[: names.index(dim_source) + 1] if dim_source in names else None
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "settings": settings,
        "dim_source": dim_source if dim_prefix else None,
        "dim_prefix": dim_prefix,
        "groups": manifest_groups,
    }
    rejects_path = out / dataset.REJECTS_FILE
    num_tokens = int(lengths.sum(dtype=np.int64))
    input_bytes = sum(s.size for s in src_list)
    parsed = sum(groups[i].nominal_bytes for i in build)
    index = dataset.Index(
        root=out,
        dim=dim,
        num_sequences=len(lengths),
        num_tokens=num_tokens,
        shards=shards,
        mean=stats.mean,
        std=stats.std,
        lengths_file=lengths_file,
        lengths_sha256=hashlib.sha256(lengths_buf).hexdigest(),
        num_rejected=len(rejects),
        extra={
            "length_histogram": dataset.length_histogram_json(lengths),
            "num_records": num_records,
            "num_ignored_files": num_ignored,
            "num_files": len(src_list),
            "stats": stats.to_json(),
            "convert": {
                "manifest": manifest_file,
                "on_error": on_error,
                "shard_bytes": settings["shard_bytes"],
                "input_bytes": input_bytes,
                "groups_built": len(build),
                "groups_reused": len(groups) - len(build),
            },
        },
    )
    # Until index.json is replaced, every new file outside the staging folder is garbage if this fails.
    written = [out / name for _, name in moves] + [out / lengths_file, out / manifest_file]
    try:
        dataset.install_shards(out, moves)
        _write(out / lengths_file, lengths_buf)
        _write(out / manifest_file, orjson.dumps(manifest))
        # rejects.jsonl is written now (the disk may be full) and moved in once index.json is.
        staged_rejects = Path(staging) / dataset.REJECTS_FILE
        if rejects:
            _write(staged_rejects, b"".join(orjson.dumps({"path": p, "line": ln, "reason": r}) + b"\n"
                                            for p, ln, r in rejects))
        _crash_point("before-index")
        with dataset.naming_full_disk(out / dataset.INDEX_FILE):
            dataset.write_index(index)
        written = []
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    _crash_point("after-index")
    if rejects:
        os.replace(staged_rejects, rejects_path)
    else:
        rejects_path.unlink(missing_ok=True)
    dataset.fsync_dir(out)
    collect_garbage(out, index)
    progress.finish()
    return ConvertResult(
        out=out,
        index=index,
        num_records=num_records,
        num_sequences=len(lengths),
        num_rejected=len(rejects),
        num_ignored_files=num_ignored,
        num_files=len(src_list),
        num_tokens=num_tokens,
        input_bytes=input_bytes,
        parsed_bytes=parsed,
        groups_built=len(build),
        groups_reused=len(groups) - len(build),
        workers=workers,
        backend=parser_backend().name,
        elapsed_s=time.perf_counter() - t0,
        rejects_path=rejects_path if rejects else None,
        num_records_fast=sum(b.num_fast for b in built.values()),
        num_records_slow=sum(b.num_records - b.num_fast for b in built.values()),
    )
