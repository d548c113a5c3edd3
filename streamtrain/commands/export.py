"""`streamtrain export`: a checkpoint as a program that runs without streamtrain (torch.export .pt2, or ONNX),
checked against the eager model."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint written by fit (RUN/checkpoints/best.pt)")
    parser.add_argument("--out", required=True, metavar="FILE", help="model.pt2 (torch.export; torch.export.load reads it) or model.onnx (needs the onnx package)")
    parser.add_argument("--data", metavar="DIR", help="dataset whose first batches the exported program is checked on (default: random vectors at a few lengths)")
    parser.add_argument("--check-batches", type=int, default=4, metavar="N", help="batches of --data to check on (default 4)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights that fit --ema kept")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check --data's checksums before use (default; --no-verify: storage you trust)")


def run(args) -> int:
    from streamtrain.errors import UserError
    from streamtrain.eval.export import export_checkpoint

    if args.check_batches < 1:
        raise UserError(f"--check-batches must be >= 1, got {args.check_batches}")
    report = export_checkpoint(args.checkpoint, args.out, args.data, args.ema, args.check_batches, args.verify)
    print(f"{report['out']}: {report['format']} program, dynamic batch and sequence length; input and output in "
          f"original units (B, T, D)")
    if report["max_abs_diff"] is None:
        print("not checked against eager: running an ONNX file needs onnxruntime (pip install onnxruntime)")
    else:
        print(f"largest |exported - eager| over {report['num_batches']} {report['inputs']}: {report['max_abs_diff']:.3g}")
    return 0
