"""The `streamtrain` command. Subcommands live in streamtrain/commands/, one module each, with
`add_arguments(parser)` and `run(args) -> int`; they import heavy libraries inside `run` so `--help` is instant.

This is the only place that turns a user error into a message: one line on stderr, exit code 2 (3 when
training diverged, `train.EXIT_DIVERGED`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from streamtrain import __version__
from streamtrain.errors import UserError

__all__ = ["main", "build_parser"]

# name -> (module under streamtrain.commands, one-line help)
_COMMANDS = {
    "convert": ("convert", "turn JSON/JSONL files or folders into a validated, checksummed Arrow shard dataset"),
    "inspect": ("inspect", "show a dataset's counts, shards, length distribution and statistics"),
    "fit": ("fit", "train a causal Transformer on a dataset (or raw JSON/JSONL folder, or synthetic data)"),
    "eval": ("eval", "evaluate a checkpoint on a dataset against persistence and mean predictors"),
    "bench": ("bench", "measure convert, loader and train throughput beside their peers and bounds on this machine"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamtrain",
        description="Train causal Transformers on sequences of fixed-width float vectors, fast.",
    )
    parser.add_argument("--version", action="version", version=f"streamtrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(f"streamtrain.commands.{module}")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"streamtrain {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"streamtrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `streamtrain inspect DIR --json | head` closes the pipe early; that is not an error.
        return 0


if __name__ == "__main__":
    sys.exit(main())
