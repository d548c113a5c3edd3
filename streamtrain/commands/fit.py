"""`streamtrain fit`: train a causal Transformer; flags are generated from the config dataclasses."""

from __future__ import annotations

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    from streamtrain.train.config import add_flags

    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of options (flags given here win)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt, exactly"
    )
    add_flags(parser)


def run(args) -> int:
    from streamtrain.train.config import flag_values
    from streamtrain.train.run import run_fit

    return run_fit(flag_values(args), config_file=args.config, resume=args.resume)
