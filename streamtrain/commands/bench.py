"""`streamtrain bench`: convert, loader and train throughput beside their peers and bounds, measured in one
run on this machine; a table, `--json` one object on the last line, and a line in the history file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a smaller corpus (8 MB), one repeat, short rounds: a smoke run, noisier (under 2 minutes on 2 cores)")
    parser.add_argument("--json", action="store_true", help="print every figure as one JSON object on the last line")
    parser.add_argument("--out", metavar="DIR", type=Path,
                        help="append the run to DIR/history.jsonl and draw DIR/history.png (default: benchmarks/ when "
                             "run from the repository root, else nowhere)")
    parser.add_argument("--no-record", action="store_true", help="do not append the run to any history file")
    parser.add_argument("--data", metavar="DIR", type=Path,
                        help="a JSON/JSONL folder (converted, then loaded and trained on) or a dataset folder (convert is "
                             "skipped); default: build the corpus, see --corpus")
    parser.add_argument("--corpus", choices=("auto", "real", "synthetic"), default="auto",
                        help="real instruction sequences (tools.asm_corpus, from a checkout), a generated heavy-tailed "
                             "corpus, or auto: real where it can run (default: %(default)s)")
    parser.add_argument("--size-mb", type=float, metavar="N", help="size of the corpus to build, MB of JSON (default 64; 8 with --quick)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the train stage runs (default: %(default)s)")
    parser.add_argument("--stages", default="convert,loader,train", help="comma-separated subset of convert,loader,train (default: %(default)s)")
    parser.add_argument("--model", default="128x4x512", metavar="DxLxFF[xH]",
                        help="train stage model: d_model x layers x ff [x heads] (default: %(default)s, 4 heads)")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="train stage padded tokens per batch (default: %(default)s)")
    parser.add_argument("--no-ablation", action="store_true", help="train stage: only fit and the seed pipeline")


def run(args) -> int:
    from streamtrain.bench import BenchOptions, run_bench
    from streamtrain.bench.history import append_history, plot_history, read_history
    from streamtrain.bench.report import print_tables
    from streamtrain.bench.run import repo_history_path

    opts = BenchOptions(quick=args.quick, data=args.data, size_mb=args.size_mb, device=args.device,
                        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()), corpus=args.corpus,
                        model=args.model, batch_tokens=args.batch_tokens, ablation=not args.no_ablation)
    result = run_bench(opts, log=lambda line: print(f"bench: {line}", file=sys.stderr, flush=True))
    print_tables(result)
    history = None if args.no_record else (args.out / "history.jsonl" if args.out else repo_history_path())
    if history is not None:
        append_history(history, result)
        drawn = plot_history(read_history(history), history.with_name("history.png"))
        print(f"bench: appended to {history}{'; plot ' + str(history.with_name('history.png')) if drawn else ''}",
              file=sys.stderr)
    if args.json:
        sys.stdout.flush()
        print(json.dumps(result, allow_nan=False))
    return 0
