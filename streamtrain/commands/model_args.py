"""The flags shared by the commands that run a trained model over a dataset (predict, embed, eval)."""

from __future__ import annotations

import argparse

__all__ = ["add_model_data_arguments", "check_model_data_arguments"]


def add_model_data_arguments(parser, out_help: str | None = None) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint written by fit (RUN/checkpoints/best.pt)")
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset folder to run the model on")
    if out_help is not None:
        parser.add_argument("--out", required=True, metavar="FILE", help=out_help)
    parser.add_argument("--batch-tokens", type=int, default=4096, metavar="T", help="padded tokens per batch (default 4096; at least one window of the training context)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    parser.add_argument("--num-workers", type=int, default=0, metavar="N", help="data loader worker processes (default 0)")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights that fit --ema kept instead of the raw ones")
    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=True,
        help="check the dataset's sha256 checksums against index.json before use, hashing only file versions not "
        "verified before (default; --no-verify: storage you trust)",
    )


def check_model_data_arguments(args) -> None:
    from streamtrain.errors import UserError

    if args.batch_tokens < 16:
        raise UserError(f"--batch-tokens must be >= 16, got {args.batch_tokens}")
    if args.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {args.num_workers}")
