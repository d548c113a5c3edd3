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
    "predict": ("predict", "write a checkpoint's next-vector predictions (or rollouts) for a dataset to an Arrow file"),
    "embed": ("embed", "write one embedding per sequence of a dataset (a checkpoint's final hidden states) to an Arrow file"),
    "export": ("export", "export a checkpoint as a torch.export (.pt2) or ONNX program, checked against the eager model"),
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
        p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="object storage setting for s3:// and gs:// paths (repeatable): endpoint_url, region, "
                            "anonymous, access_key, secret_key, session_token, connect_timeout, request_timeout, "
                            "retry_seconds; never written to any file")
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from streamtrain.storage.location import parse_storage_options, redact, set_default_options

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what `fit --nproc` passes on to the processes it starts
    options: dict[str, str] = {}
    try:
        options = parse_storage_options(args.storage_option)
        set_default_options(options)
        return int(args._run(args) or 0)
    except UserError as e:
        # no credential reaches a terminal or a log, whatever text an error carries
        print(f"streamtrain {args.command}: error: {redact(str(e), options)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"streamtrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `streamtrain inspect DIR --json | head` closes the pipe early; that is not an error.
        return 0


if __name__ == "__main__":
    sys.exit(main())
