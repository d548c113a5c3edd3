"""`streamtrain inspect DIR [--json] [--verify]`: counts, shards, length distribution, statistics.

Rich tables on a terminal, plain text otherwise, one JSON object with --json. Never imports torch.
"""

from __future__ import annotations

import json
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="dataset folder (made by `streamtrain convert`), or its s3:// / gs:// prefix")
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="for a remote dataset: where its index and lengths are cached (default: the user cache's remote/)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--verify", action="store_true",
                        help="re-read every shard and check sizes, checksums and counts against index.json (exit 2 on any mismatch)")


def _print_rich(s) -> None:
    from rich.console import Console
    from rich.table import Table

    from streamtrain.dataset.summary import _histogram_rows, _length_line

    con = Console()
    head = Table(title=f"dataset {s.root}", show_header=False, box=None)
    head.add_row("sequences", f"{s.num_sequences:,}")
    head.add_row("tokens", f"{s.num_tokens:,}")
    head.add_row("dim", str(s.dim))
    head.add_row("shards", f"{len(s.shards)} ({s.bytes / 1e6:,.1f} MB)")
    if s.num_records is not None:
        head.add_row("records seen", f"{s.num_records:,}")
    head.add_row("rejected", f"{s.num_rejected:,}" + (f" (see {s.rejects_file})" if s.rejects_file else ""))
    if s.num_ignored_files:
        head.add_row("ignored files", f"{s.num_ignored_files:,}")
    head.add_row("length", _length_line(s.lengths))
    con.print(head)
    rows = _histogram_rows(s.lengths)
    if rows:
        hist = Table(title="vectors per sequence")
        hist.add_column("length", justify="right")
        hist.add_column("sequences", justify="right")
        hist.add_column("")
        for lo, hi, c, bar in rows:
            hist.add_row(f"{lo}-{hi}", f"{c:,}", bar)
        con.print(hist)
    shards = Table(title="shards")
    for col in ("file", "sequences", "tokens", "MB", "first_id", "sha256"):
        shards.add_column(col, justify="left" if col in ("file", "sha256") else "right")
    for sh in s.shards:
        shards.add_row(sh.file, f"{sh.num_sequences:,}", f"{sh.num_tokens:,}", f"{sh.bytes / 1e6:.2f}", f"{sh.first_id:,}", sh.sha256[:12])
    con.print(shards)
    stats = Table(title="per-dimension statistics")
    for col in ("dim", "mean", "std"):
        stats.add_column(col, justify="right")
    for i, (m, sd) in enumerate(zip(s.mean, s.std)):
        stats.add_row(str(i), f"{m:.6g}", f"{sd:.6g}")
    con.print(stats)
    if s.problems is not None:
        con.print("[green]verify OK: every shard matches index.json" if not s.problems
                  else "[red]verify FAILED:\n" + "\n".join(s.problems))


def run(args) -> int:
    from streamtrain.dataset.summary import render_text, summarize
    from streamtrain.errors import DataError

    from streamtrain.storage.location import is_remote

    if is_remote(args.dir):
        from streamtrain.storage.remote import remote_summary

        s = remote_summary(args.dir, args.verify, args.cache_dir)
    else:
        s = summarize(args.dir, verify=args.verify)
    if args.json:
        print(json.dumps(s.to_json(), allow_nan=False))
    elif sys.stdout.isatty():
        _print_rich(s)
    else:
        print(render_text(s))
    if s.problems:
        raise DataError(f"{args.dir}: {len(s.problems)} problem{'s' if len(s.problems) != 1 else ''}: " + "; ".join(s.problems))
    return 0
