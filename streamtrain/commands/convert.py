"""`streamtrain convert SRC [SRC...] --out DIR`: JSON/JSONL files or folders → Arrow shard dataset.

Thin: parses flags, draws progress (a rich bar when stderr is a terminal, nothing otherwise), prints the
one-line summary. The work is in streamtrain.convert. Never imports torch.
"""

from __future__ import annotations

import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SRC", help="JSON/JSONL files or folders (searched recursively for *.json and *.jsonl)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="dataset folder to create or update, or an s3:// / gs:// prefix (index.json is written last)")
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="with an s3:// SRC or --out: where the JSON is mirrored and the dataset staged before "
                             "upload, kept so reruns stay incremental (default: the user cache's remote/)")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="parallel processes (default: all cores this process may use)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="fail: stop at the first bad record and write nothing (default); skip: keep every good record and list the bad ones in DIR/rejects.jsonl")
    parser.add_argument("--dim", type=int, default=None, metavar="D", help="values per vector (default: taken from the first valid record)")
    parser.add_argument("--shard-mb", type=float, default=64, metavar="MB", help="target input megabytes per shard (default 64)")
    parser.add_argument("--force", action="store_true", help="rebuild everything instead of reusing shards of unchanged inputs")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _rich_progress():
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from streamtrain.convert import ConvertProgress

    class RichProgress(ConvertProgress):
        def __init__(self) -> None:
            self.bar = Progress(
                TextColumn("[bold]convert"), BarColumn(), DownloadColumn(binary_units=False), TransferSpeedColumn(),
                TextColumn("{task.fields[files]}/{task.fields[total_files]} files, {task.fields[records]:,} records"),
                TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
            )
            self.task = None
            self.running = False

        def start(self, total_bytes: int, total_files: int, reused_bytes: int) -> None:
            self.bar.start()
            self.running = True
            self.task = self.bar.add_task("convert", total=max(total_bytes, 1), files=0, total_files=total_files, records=0)

        def advance(self, parsed_bytes: int, records: int, files: int) -> None:
            t = self.bar.tasks[0]
            self.bar.update(self.task, advance=parsed_bytes, records=t.fields["records"] + records, files=t.fields["files"] + files)

        def finish(self) -> None:
            if self.running:
                self.bar.stop()
                self.running = False

    return RichProgress()


def run(args) -> int:
    from streamtrain.convert import convert
    from streamtrain.storage.location import Location, is_remote

    sources = list(args.sources)
    if any(is_remote(src) for src in sources) or is_remote(args.out):
        from streamtrain.storage.transfer import mirror
        from streamtrain.storage.remote import local_folder

        sources = [str(mirror(Location.of(src), local_folder(args.cache_dir, "mirror", src))) if is_remote(src) else src
                   for src in sources]
    out = local_folder(args.cache_dir, "out", args.out) if is_remote(args.out) else args.out
    progress = None
    if not args.quiet and sys.stderr.isatty():
        progress = _rich_progress()
    try:
        result = convert(
            sources, out, workers=args.workers, on_error=args.on_error, dim=args.dim,
            shard_mb=args.shard_mb, force=args.force, progress=progress,
        )
    finally:
        if progress is not None:
            progress.finish()
    published = None
    if is_remote(args.out):
        from streamtrain.storage.transfer import publish

        published = publish(out, Location.of(args.out))
    if not args.quiet:
        mb = result.input_bytes / 1e6
        reused = f", reused {result.groups_reused} of {result.groups_reused + result.groups_built} shards" if result.groups_reused else ""
        print(
            f"kept {result.num_sequences:,} sequences, rejected {result.num_rejected:,}, ignored {result.num_ignored_files:,} files "
            f"({result.num_records:,} records in {result.num_files:,} files); {result.num_tokens:,} tokens, dim {result.index.dim}; "
            f"{mb:,.1f} MB in {result.elapsed_s:.2f} s ({result.input_mb_per_s:,.1f} MB/s, {result.workers} workers{reused}) -> "
            f"{args.out if published else result.out}"
        )
        if published:
            print(f"uploaded {published['uploaded']} shards ({published['bytes'] / 1e6:,.1f} MB), kept "
                  f"{published['reused']} already there, removed {published['deleted']} stale objects; "
                  f"index.json written last -> {args.out}")
        if result.rejects_path is not None:
            print(f"rejects: {result.rejects_path}")
    return 0
