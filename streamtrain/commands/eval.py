"""`streamtrain eval`: a checkpoint's next-vector MSE on a dataset, against persistence and mean predictors."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint written by fit (RUN/checkpoints/best.pt)")
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset folder (or s3:// / gs:// prefix) to evaluate on")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--batch-tokens", type=int, default=4096, metavar="T", help="padded tokens per batch (default 4096; at least one window of the training context)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    parser.add_argument("--num-workers", type=int, default=0, metavar="N", help="data loader worker processes (default 0)")
    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=True,
        help="check the dataset's sha256 checksums against index.json before use, hashing only file versions not "
        "verified before (default; --no-verify: storage you trust)",
    )
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="for an s3:// / gs:// --data: the node-local shard cache (default: the user cache's remote/)")
    parser.add_argument("--cache-limit", metavar="SIZE", default=None,
                        help="for a remote --data: most bytes the cache holds, e.g. 20GB (default: no limit)")
    parser.add_argument("--horizon", type=int, metavar="K", help="also roll out K steps (predictions fed back) and report the MSE of each step against persistence and the mean")
    parser.add_argument("--prefix", type=int, metavar="P", help="with --horizon: vectors of real history before the rollout (default min(8, context - K)); sequences shorter than P + K are not scored")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights that fit --ema kept")
    parser.add_argument(
        "--onehot",
        metavar="START:END",
        help="fields START..END-1 one-hot encode a class (0:12 is the opcode class of tools/asm_corpus.py): "
        "also report top-1 accuracy against the previous-vector and most-frequent-class baselines",
    )


def run(args) -> int:
    import json
    import sys

    from streamtrain.errors import UserError
    from streamtrain.eval.evaluate import evaluate_checkpoint

    if args.batch_tokens < 16:
        raise UserError(f"--batch-tokens must be >= 16, got {args.batch_tokens}")
    if args.prefix is not None and args.horizon is None:
        raise UserError("--prefix needs --horizon (how many steps to roll out after it)")
    if args.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {args.num_workers}")
    onehot = None
    if args.onehot is not None:
        try:
            start, end = (int(v) for v in args.onehot.split(":"))
        except ValueError:
            raise UserError(f"--onehot expects START:END (two integers), got {args.onehot!r}") from None
        onehot = (start, end)
    report = evaluate_checkpoint(args.checkpoint, args.data, args.batch_tokens, args.device, args.num_workers, onehot,
                                 verify=args.verify, horizon=args.horizon, prefix=args.prefix, ema=args.ema,
                                 cache_dir=args.cache_dir, cache_limit=args.cache_limit)
    if report["batch_tokens"] != args.batch_tokens:
        print(
            f"streamtrain eval: --batch-tokens {args.batch_tokens} raised to {report['batch_tokens']} to hold one "
            f"window of the training context ({report['max_len']} vectors)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(report))
        return 0
    show = lambda v: "n/a" if v is None else f"{v:.6g}"  # noqa: E731
    rows = [
        ("model mse", report["mse"]),
        ("persistence mse", report["persistence_mse"]),
        ("mean mse", report["mean_mse"]),
        ("skill vs persistence", report["skill_vs_persistence"]),
        ("skill vs mean", report["skill_vs_mean"]),
    ]
    print(f"{args.data}: {report['num_sequences']} sequences, {report['num_tokens']} vectors, {report['num_targets']} targets")
    print(f"  windows of at most {report['max_len']} vectors (the training context)")
    for name, value in rows:
        print(f"  {name:<22}{show(value)}")
    if onehot is not None:
        oh = report["onehot"]
        print(f"  top-1 class, fields {onehot[0]}:{onehot[1]}")
        for name, key in (("model", "accuracy"), ("same as previous", "previous_accuracy"), ("most frequent", "most_frequent_accuracy")):
            print(f"    {name:<20}{show(oh[key])}")
    for group in report.get("categorical", []):
        a, b = group["fields"]
        print(f"  top-1 class, trained group {a}:{b}")
        for name, key in (("model", "accuracy"), ("same as previous", "previous_accuracy"), ("most frequent", "most_frequent_accuracy")):
            print(f"    {name:<20}{show(group[key])}")
    if args.horizon is not None:
        ro = report["rollout"]
        print(f"  rollout after {ro['prefix']} vectors, {ro['num_sequences']} sequences: mse per step (persistence, mean)")
        for k, (m, p, mn) in enumerate(zip(ro["mse"], ro["persistence_mse"], ro["mean_mse"]), start=1):
            print(f"    step {k:<4}{show(m):>12}  ({show(p)}, {show(mn)})")
    worst = sorted(enumerate(report["per_dim_mse"]), key=lambda kv: -kv[1])[:5]
    if worst:
        print("  worst dims (mse): " + ", ".join(f"{d}: {show(v)}" for d, v in worst))
    return 0
