"""`streamtrain fit`: train a causal Transformer; flags are generated from the config dataclasses."""

from __future__ import annotations

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    from streamtrain.train.config import add_flags

    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of options (flags given here win)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt, exactly"
    )
    parser.add_argument(
        "--nproc", type=int, metavar="N",
        help="train in N processes on this node (data parallel), started through torchrun --standalone; "
        "many nodes: run torchrun yourself (see README) [processes]",
    )
    add_flags(parser)


def run(args) -> int:
    if args.nproc is not None:
        if args.nproc < 1:
            from streamtrain.errors import UserError

            raise UserError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc > 1:
            from streamtrain.train.config import flag_values, read_config_file, resolve_config
            from streamtrain.train.launch import launch_local, without_nproc

            # bad flags: one line here, not one per rank and torchrun's report of failed ranks
            file_values = read_config_file(args.config) if args.config else {}
            cfg = resolve_config(flag_values(args), file_values)
            if not args.resume:  # a resumed run takes the rest from its checkpoint
                cfg.check_complete()
            argv = args.argv[args.argv.index("fit") + 1 :]
            return launch_local(args.nproc, without_nproc(argv))
    from streamtrain.train.config import flag_values
    from streamtrain.train.run import run_fit

    return run_fit(flag_values(args), config_file=args.config, resume=args.resume)
