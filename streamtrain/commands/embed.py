"""`streamtrain embed`: one vector per sequence of a dataset from a checkpoint's final hidden states, as an
Arrow IPC file."""

from __future__ import annotations

from streamtrain.commands.model_args import add_model_data_arguments, check_model_data_arguments

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    add_model_data_arguments(
        parser, out_help="Arrow IPC file to write: columns id (int64) and embedding (d_model float32)",
    )
    parser.add_argument("--pool", choices=("mean", "last"), default="mean",
                        help="mean over the sequence's real positions (default) or the state at its last vector")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")


def run(args) -> int:
    import sys

    from streamtrain.eval.embed import embed_file

    check_model_data_arguments(args)
    summary = embed_file(args.checkpoint, args.data, args.out, args.pool, args.batch_tokens, args.device,
                         args.num_workers, args.verify, args.ema, args.quiet)
    if not args.quiet:
        print(f"{summary['out']}: {summary['num_sequences']} embeddings of {summary['d_model']} floats "
              f"({summary['pool']} pool)", file=sys.stderr)
    return 0
