"""The command line: ``python -m tools.asm_corpus --out DIR ...`` (from the repository root).

User errors (bad path, not an ELF, bad option) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .build import DEFAULT_MAX_MB, build_corpus
from .decoders import decoder_available, resolve_decoder
from .discover import DEFAULT_BINARY_DIRS, available
from .errors import CorpusError
from .write import FORMATS

__all__ = ["main"]


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(2, f"asm_corpus: error: {message}\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog="python -m tools.asm_corpus",
        description="Turn this machine's x86-64 binaries into a corpus of 28-dim instruction-vector sequences.",
    )
    parser.add_argument("--out", help="output folder (created; a previous corpus there is replaced)")
    parser.add_argument(
        "--max-mb", type=float, default=DEFAULT_MAX_MB, help="stop after about this many MB (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for binary order, sampling, layout and split")
    parser.add_argument("--format", choices=FORMATS, default="mixed", help="file/record layout (default %(default)s)")
    parser.add_argument(
        "--binaries",
        nargs="+",
        metavar="PATH",
        help="ELF files or folders (default: " + ", ".join(DEFAULT_BINARY_DIRS) + ")",
    )
    parser.add_argument(
        "--split",
        type=float,
        default=0.0,
        metavar="VAL_FRACTION",
        help="fraction of binaries written to val/, whole binaries at a time (default 0)",
    )
    parser.add_argument(
        "--test-split",
        type=float,
        default=0.0,
        metavar="TEST_FRACTION",
        help="fraction of binaries written to test/, whole binaries at a time, for a score that model "
        "selection on val/ never saw (default 0)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs available)")
    parser.add_argument(
        "--decoder",
        choices=("auto", "iced", "objdump"),
        default="auto",
        help="instruction decoder (default %(default)s: iced-x86 if installed, else objdump)",
    )
    parser.add_argument(
        "--check", action="store_true", help="only report whether a corpus can be built here (exit 0 yes, 1 no)"
    )
    args = parser.parse_args(argv)
    if not args.check and not args.out:
        parser.error("the following arguments are required: --out")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.check:
        if available():
            print(f"asm_corpus: ready (decoder: {resolve_decoder('auto')})")
            return 0
        missing = "a decoder (pip install iced-x86, or binutils)" if not decoder_available() else "x86-64 ELF binaries"
        print(f"asm_corpus: cannot build a corpus here: no {missing}", file=sys.stderr)
        return 1
    try:
        build_corpus(
            args.out,
            max_mb=args.max_mb,
            seed=args.seed,
            fmt=args.format,
            binaries=args.binaries,
            split=args.split,
            test_split=args.test_split,
            jobs=args.jobs,
            decoder=args.decoder,
            verbose=True,
        )
    except CorpusError as error:
        print(f"asm_corpus: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"asm_corpus: error: {error}", file=sys.stderr)
        return 1
    return 0
