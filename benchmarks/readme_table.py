"""Write the README's benchmark table from the latest recorded `streamtrain bench` run, between its marker
comments, so that no figure in the README exists without a run behind it.

    python benchmarks/readme_table.py [--history benchmarks/history.jsonl] [--readme README.md] [--allow-quick]

Takes the newest full run (not --quick); with --allow-quick the newest run of either kind (the table then
says --quick). Exit 2 when no run is recorded or the README has no marker block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamtrain.bench.history import latest_run, read_history
from streamtrain.bench.report import render_readme
from streamtrain.dataset import atomic_write_bytes

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--history", type=Path, default=ROOT / "benchmarks" / "history.jsonl")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--allow-quick", action="store_true", help="fall back to a --quick run when no full run is recorded")
    args = p.parse_args(argv)
    history = read_history(args.history)
    run = latest_run(history, full_only=True)
    if run is None or (run.get("quick") and not args.allow_quick):
        print(f"readme_table: error: {args.history}: no full `streamtrain bench` run recorded "
              f"(run `streamtrain bench` from the repository root, or pass --allow-quick)", file=sys.stderr)
        return 2
    try:
        text = render_readme(args.readme.read_text(), run)
    except ValueError as e:
        print(f"readme_table: error: {args.readme}: {e}", file=sys.stderr)
        return 2
    atomic_write_bytes(args.readme, text.encode())
    print(f"{args.readme}: table of the run of {run.get('machine', {}).get('time', '?')} "
          f"(commit {(run.get('commit') or '?')[:10]}{', --quick' if run.get('quick') else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
