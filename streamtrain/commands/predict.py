"""`streamtrain predict`: a checkpoint's next-vector predictions for every sequence of a dataset, as an
Arrow IPC file."""

from __future__ import annotations

from streamtrain.commands.model_args import add_model_data_arguments, check_model_data_arguments

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    add_model_data_arguments(
        parser, out_help="Arrow IPC file to write: columns id (int64) and prediction (one vector per position, "
        "original units; row t predicts vector t + 1)",
    )
    parser.add_argument("--horizon", type=int, metavar="K", help="roll out K vectors instead, each prediction fed back as the next input (KV cache): columns id, prefix, rollout")
    parser.add_argument("--prefix", type=int, metavar="P", help="with --horizon: start after the first P vectors of each sequence (at most the training context; default: after the whole sequence)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")


def run(args) -> int:
    import sys

    from streamtrain.eval.predict import predict_file

    check_model_data_arguments(args)
    summary = predict_file(args.checkpoint, args.data, args.out, args.batch_tokens, args.device, args.num_workers,
                           args.verify, args.ema, args.quiet, args.horizon, args.prefix)
    if not args.quiet:
        what = "predictions" if args.horizon is None else f"rollouts of {args.horizon} vectors"
        print(f"{summary['out']}: {what} for {summary['num_sequences']} sequences "
              f"(windows of at most {summary['max_len']} vectors, the training context)", file=sys.stderr)
    return 0
