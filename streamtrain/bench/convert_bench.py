"""Convert throughput beside the stdlib json reader: each contender a fresh process (start-up included),
alternating so they share the machine's load; medians of the rounds. Never imports torch."""

from __future__ import annotations

import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from streamtrain.bench.corpus import json_bytes
from streamtrain.errors import UserError

__all__ = ["STDLIB_READER", "run_timed", "measure_convert"]

# The peer: what a user writes without streamtrain, every record into a float32 array.
STDLIB_READER = r"""
import json, os, sys
import numpy as np

def sequence(value):
    return value["sequence"] if isinstance(value, dict) else value

out = []
for root, _, files in os.walk(sys.argv[1]):
    for name in sorted(files):
        path = os.path.join(root, name)
        if name.endswith(".jsonl"):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        out.append(np.array(sequence(json.loads(line)), dtype=np.float32))
        elif name.endswith(".json"):
            with open(path) as f:
                out.append(np.array(sequence(json.load(f)), dtype=np.float32))
print(len(out), sum(len(a) for a in out))
"""

# "(123.4 MB/s, 2 workers" in convert's summary line: the conversion without interpreter start-up.
_ENGINE_RATE = re.compile(r"\(([0-9,.]+) MB/s, \d+ workers")


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process tree, stdout) of `cmd`; a failure is a UserError naming it."""
    cpu0 = _children_cpu_s()
    t0 = time.perf_counter()
    # stderr is a pipe too, so convert draws no progress bar.
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UserError(f"bench: {' '.join(cmd[:4])} ... failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    return time.perf_counter() - t0, _children_cpu_s() - cpu0, done.stdout


def measure_convert(corpus: Path, work: Path, workers: int, repeats: int) -> tuple[dict, Path]:
    """Convert `corpus` with `workers` workers and read it with the stdlib peer, `repeats` rounds each.
    Returns (figures, the last converted dataset folder, kept for the loader and train stages)."""
    mb = json_bytes(corpus) / 1e6
    for p in Path(corpus).rglob("*.json*"):  # warm the page cache: every contender reads from memory
        p.read_bytes()
    names = ("convert", "stdlib")
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    engine = []
    out = work / "dataset"
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if name == "stdlib":
                cmd = [sys.executable, "-c", STDLIB_READER, str(corpus)]
            else:
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-m", "streamtrain", "convert", str(corpus), "--out", str(out),
                       "--workers", str(workers)]
            w, c, stdout = run_timed(cmd)
            wall[name].append(w)
            cpu[name].append(c)
            m = _ENGINE_RATE.search(stdout) if name == "convert" else None
            if m:
                engine.append(float(m.group(1).replace(",", "")))
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    figures = {
        "convert_corpus_mb": round(mb, 3),
        "convert_workers": workers,
        "convert_mb_per_s": mb / med["convert"],
        "stdlib_convert_mb_per_s": mb / med["stdlib"],
        "convert_vs_stdlib": med["stdlib"] / med["convert"],
        "convert_engine_mb_per_s": statistics.median(engine) if engine else None,
        "convert_mb_per_cpu_s": mb / med_cpu["convert"] if med_cpu["convert"] > 0 else None,
        "stdlib_convert_mb_per_cpu_s": mb / med_cpu["stdlib"] if med_cpu["stdlib"] > 0 else None,
        "convert_repeats": repeats,
    }
    return figures, out
