"""Throughput of `streamtrain convert` (1 and 2 workers) against a plain stdlib json + numpy reader.

Corpus (one of):
  --asm        the real instruction corpus of tools/asm_corpus (this machine's binaries, 28 values per
               vector such as 0, 1, 0.0333, -0.125; .json files of one array or one {"sequence": ...} object,
               .jsonl files mixing both forms). The default when `python -m tools.asm_corpus --check` succeeds.
  --synthetic  a generated corpus like real encodings: heavy-tailed lengths (lognormal, median ~30, p99 ~1000
               vectors), mostly 0/1 integers and some 6-significant-digit floats, .jsonl files and folders of
               single-record .json files. The default otherwise.
  --corpus DIR reuse (or create) the corpus in DIR.

Every contender runs as a fresh process (startup included), round-robin so they share the machine's load;
the figures are medians of --repeats rounds. Besides wall time it reports each contender's CPU time (user +
sys of the process tree: what the work costs, less sensitive to other load) and convert's own MB/s (from its
summary line: the conversion without interpreter start-up). The 1-minute load average before and after is
printed: figures taken while it is high (other processes on the machine) are noisy; re-run then.
Prints a table, then one JSON line.

    python benchmarks/bench_convert.py [--asm | --synthetic] [--mb 64] [--corpus DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from corpus import asm_corpus  # benchmarks/corpus.py

from streamtrain.bench.convert_bench import STDLIB_READER, run_timed
from streamtrain.bench.corpus import json_bytes, write_synthetic_json

DIM = 28
# "(123.4 MB/s, 2 workers" in convert's summary line.
_CONVERT_RATE = re.compile(r"\(([0-9,.]+) MB/s, \d+ workers")


def make_corpus(folder: Path, total_mb: float, seed: int = 0) -> None:
    """The synthetic corpus (see the module docstring)."""
    write_synthetic_json(folder, total_mb, DIM, seed)


def asm_available() -> bool:
    return asm_corpus.available()


def make_asm_corpus(folder: Path, total_mb: float, seed: int = 0) -> Path:
    """Build the real corpus with tools/asm_corpus into `folder`; returns the folder of its records."""
    manifest = asm_corpus.build_corpus(folder, total_mb, seed, "mixed", None, 0.0, jobs=1)
    totals = manifest["totals"]
    print(f"asm corpus: {totals['bytes'] / 1e6:.1f} MB, {totals['files']} files, {totals['functions']} functions "
          f"from {totals['binaries']} binaries", file=sys.stderr)
    return folder / "train"  # split 0: every record is in train/ (beside it only the hidden .manifest.json)


def idle_share(seconds: float = 1.0) -> float | None:
    """Share of the machine's CPU time that was idle over the next `seconds` (Linux /proc/stat; else None)."""
    def sample() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]

    try:
        a = sample()
        time.sleep(seconds)
        b = sample()
    except (OSError, ValueError):
        return None
    delta = [y - x for x, y in zip(a, b)]
    return (delta[3] + delta[4]) / max(sum(delta), 1)  # idle + iowait


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--asm", action="store_true", help="the real corpus of tools/asm_corpus (default when it can be built)")
    kind.add_argument("--synthetic", action="store_true", help="the generated lognormal corpus")
    ap.add_argument("--mb", type=float, default=64, help="corpus size to build, MB (>= 50 for a fair figure)")
    ap.add_argument("--corpus", type=Path, default=None, help="reuse (or create) the corpus in this folder")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    use_asm = args.asm or (not args.synthetic and asm_available())

    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        root = args.corpus or tmp / "corpus"
        corpus = root / "train" if use_asm else root
        if not corpus.exists() or json_bytes(corpus) == 0:
            if use_asm:
                corpus = make_asm_corpus(root, args.mb, args.seed)
            else:
                make_corpus(corpus, args.mb, args.seed)
        mb = json_bytes(corpus) / 1e6
        num_files = sum(1 for p in corpus.rglob("*") if p.suffix in (".json", ".jsonl"))
        # Warm the page cache so every contender reads from memory.
        for p in corpus.rglob("*.json*"):
            p.read_bytes()
        load_before = os.getloadavg()[0]
        idle_before = idle_share()
        names = ["convert_1w", "convert_2w", "stdlib"]
        wall = {k: [] for k in names}
        cpu = {k: [] for k in names}
        engine = {k: [] for k in names[:2]}
        for r in range(args.repeats):
            for name in names:
                if name == "stdlib":
                    cmd = [sys.executable, "-c", STDLIB_READER, str(corpus)]
                else:
                    out = tmp / f"out-{name}-{r}"
                    cmd = [sys.executable, "-m", "streamtrain", "convert", str(corpus), "--out", str(out),
                           "--workers", name[-2]]
                w, c, stdout = run_timed(cmd)
                wall[name].append(w)
                cpu[name].append(c)
                if name != "stdlib":
                    m = _CONVERT_RATE.search(stdout)
                    if m:
                        engine[name].append(float(m.group(1).replace(",", "")))
                    shutil.rmtree(out, ignore_errors=True)
        load_after = os.getloadavg()[0]
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        med_engine = {k: statistics.median(v) if v else None for k, v in engine.items()}

        print(f"\nconvert benchmark: {'asm' if use_asm else 'synthetic'} corpus {mb:.1f} MB in {num_files} files, "
              f"median of {args.repeats}, {len(os.sched_getaffinity(0))} CPUs, "
              f"load avg 1m {load_before:.2f} before / {load_after:.2f} after, "
              f"idle CPU before {'?' if idle_before is None else f'{idle_before:.0%}'}")
        print(f"{'contender':<12} {'wall s':>8} {'MB/s':>8} {'x stdlib':>9} {'cpu s':>7} {'MB/cpu-s':>9} {'engine MB/s':>12}")
        for k in names:
            eng = med_engine.get(k)
            print(f"{k:<12} {med[k]:>8.3f} {mb / med[k]:>8.1f} {med['stdlib'] / med[k]:>9.2f} {med_cpu[k]:>7.2f} "
                  f"{mb / med_cpu[k]:>9.1f} {'' if eng is None else f'{eng:.1f}':>12}")
        # Our own runs keep about 1-2 processes busy; more than that, or a busy machine at the start, is noise.
        if (idle_before is not None and idle_before < 0.9) or load_after > len(os.sched_getaffinity(0)) + 0.5:
            print("note: the machine was busy with other work; figures are noisy, re-run when it is idle")
        from streamtrain.convert import parser_backend

        result = {
            "corpus": "asm" if use_asm else "synthetic",
            "corpus_mb": round(mb, 1),
            "num_files": num_files,
            "convert_1w_mb_s": round(mb / med["convert_1w"], 1),
            "convert_2w_mb_s": round(mb / med["convert_2w"], 1),
            "stdlib_mb_s": round(mb / med["stdlib"], 1),
            "speedup_1w": round(med["stdlib"] / med["convert_1w"], 2),
            "speedup_2w": round(med["stdlib"] / med["convert_2w"], 2),
            "convert_1w_engine_mb_s": med_engine["convert_1w"],
            "convert_2w_engine_mb_s": med_engine["convert_2w"],
            "convert_1w_mb_per_cpu_s": round(mb / med_cpu["convert_1w"], 1),
            "convert_2w_mb_per_cpu_s": round(mb / med_cpu["convert_2w"], 1),
            "stdlib_mb_per_cpu_s": round(mb / med_cpu["stdlib"], 1),
            "repeats": args.repeats,
            "backend": parser_backend().name,
            "cpus": len(os.sched_getaffinity(0)),
            "load_avg_1m_before": round(load_before, 2),
            "load_avg_1m_after": round(load_after, 2),
            "idle_cpu_before": None if idle_before is None else round(idle_before, 3),
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
