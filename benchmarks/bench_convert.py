"""Throughput of `streamtrain convert` (1 and 2 workers) against a plain stdlib json + numpy reader.

Generates a corpus like real instruction encodings (or reuses --corpus DIR): heavy-tailed sequence lengths
(lognormal, median ~30, p99 ~1000 vectors), 28 values per vector, mostly 0/1 integers and some floats with
6 significant digits, written as a mix of .jsonl files and single-record .json files. Every contender runs as
a fresh process (startup included), round-robin so they share the machine's load, median of --repeats.
Prints one JSON line.

    python benchmarks/bench_convert.py [--mb 64] [--corpus DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 28
STDLIB_READER = r"""
import json, os, sys
import numpy as np
out = []
for root, _, files in os.walk(sys.argv[1]):
    for name in sorted(files):
        path = os.path.join(root, name)
        if name.endswith(".jsonl"):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        out.append(np.array(json.loads(line), dtype=np.float32))
        elif name.endswith(".json"):
            with open(path) as f:
                out.append(np.array(json.load(f), dtype=np.float32))
print(len(out), sum(len(a) for a in out))
"""


def make_corpus(folder: Path, total_mb: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    # A pool of vector texts; records sample rows from it (generation speed, not realism, is the limit here).
    ints = rng.integers(0, 2, size=(8192, DIM - 6))
    floats = rng.random((8192, 6)) * 10.0 ** rng.integers(-3, 3, size=(8192, 6))
    pool = ["[" + ", ".join([*map(str, i), *(f"{x:.6g}" for x in f)]) + "]" for i, f in zip(ints, floats)]
    sigma = np.log(1000 / 30) / 2.326  # p99 / median of a lognormal = exp(2.326 sigma)
    folder.mkdir(parents=True, exist_ok=True)
    total, file_no = 0, 0
    while total < total_mb * 1e6:
        if file_no % 4 == 3:  # a folder of single-record .json files
            sub = folder / f"single-{file_no:04d}"
            sub.mkdir()
            for k in range(200):
                n = int(np.clip(rng.lognormal(np.log(30), sigma), 2, 20000))
                text = "[" + ", ".join(pool[i] for i in rng.integers(0, len(pool), n)) + "]"
                (sub / f"rec-{k:04d}.json").write_text(text)
                total += len(text)
        else:
            lines = []
            size = 0
            while size < 4e6:
                n = int(np.clip(rng.lognormal(np.log(30), sigma), 2, 20000))
                lines.append("[" + ", ".join(pool[i] for i in rng.integers(0, len(pool), n)) + "]")
                size += len(lines[-1]) + 1
            (folder / f"part-{file_no:04d}.jsonl").write_text("\n".join(lines) + "\n")
            total += size
        file_no += 1


def corpus_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in (".json", ".jsonl"))


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=64, help="corpus size to generate, MB (>= 50 for a fair figure)")
    ap.add_argument("--corpus", type=Path, default=None, help="reuse (or create) the corpus in this folder")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        corpus = args.corpus or tmp / "corpus"
        if not corpus.exists() or corpus_bytes(corpus) == 0:
            make_corpus(corpus, args.mb)
        mb = corpus_bytes(corpus) / 1e6
        # Warm the page cache so every contender reads from memory.
        for p in corpus.rglob("*.json*"):
            p.read_bytes()
        times: dict[str, list[float]] = {"convert_1w": [], "convert_2w": [], "stdlib": []}
        for r in range(args.repeats):
            for name in times:
                if name == "stdlib":
                    cmd = [sys.executable, "-c", STDLIB_READER, str(corpus)]
                else:
                    out = tmp / f"out-{name}-{r}"
                    cmd = [sys.executable, "-m", "streamtrain", "convert", str(corpus), "--out", str(out),
                           "--workers", name[-2], "--quiet"]
                times[name].append(_timed(cmd))
                if name != "stdlib":
                    shutil.rmtree(tmp / f"out-{name}-{r}", ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        from streamtrain.convert import parser_backend

        result = {
            "corpus_mb": round(mb, 1),
            "convert_1w_mb_s": round(mb / med["convert_1w"], 1),
            "convert_2w_mb_s": round(mb / med["convert_2w"], 1),
            "stdlib_mb_s": round(mb / med["stdlib"], 1),
            "speedup_1w": round(med["stdlib"] / med["convert_1w"], 2),
            "speedup_2w": round(med["stdlib"] / med["convert_2w"], 2),
            "repeats": args.repeats,
            "backend": parser_backend().name,
            "cpus": len(os.sched_getaffinity(0)),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
