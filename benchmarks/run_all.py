"""Run every benchmark, append the results to benchmarks/history.jsonl, and plot the history.

    python benchmarks/run_all.py [--only convert,loader,train] [--quick] [--no-record] [--plot-only]

Each benchmark runs in its own process (one at a time: they would otherwise compete for the same cores)
and prints one JSON line last; this script keeps that line, adds when, which commit and which machine, and
appends one object per run to history.jsonl. `history.png` shows the headline figure of each benchmark
on one panel and its ratio to the peer measured in the same run on the other, over time. Ratios are what to compare across runs:
absolute rates move with the machine and whatever else it is doing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from streamtrain.bench.history import plot_history

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HISTORY = HERE / "history.jsonl"
PLOT = HERE / "history.png"

# name -> (script, extra args for --quick)
BENCHMARKS = {
    "convert": ("bench_convert.py", ["--mb", "20", "--repeats", "2"]),
    "loader": ("bench_loader.py", ["--sequences", "8000", "--repeats", "2"]),
    "train": ("bench_train.py", ["--sequences", "4000", "--rounds", "2"]),
}

def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "host": platform.node()}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_one(name: str, quick: bool) -> dict | None:
    script, quick_args = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / script), *(quick_args if quick else [])]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    start_s = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        print(f"== {name}: failed with exit code {proc.returncode}", file=sys.stderr)
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        print(f"== {name}: printed no JSON result", file=sys.stderr)
        return None
    result = json.loads(lines[-1])
    result["wall_s"] = round(time.perf_counter() - start_s, 1)
    return result


def plot(history: list[dict], out: Path = PLOT) -> bool:
    """history.png: every figure on one panel, every ratio to a peer on the other (`streamtrain bench` runs
    and this script's alike)."""
    if plot_history(history, out):
        return True
    print("history.png not drawn: matplotlib is missing (pip install -e '.[plot]')", file=sys.stderr)
    return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ",".join(BENCHMARKS))
    p.add_argument("--quick", action="store_true", help="smaller corpora and fewer repeats (a smoke run; noisier)")
    p.add_argument("--no-record", action="store_true", help="do not append to history.jsonl")
    p.add_argument("--plot-only", action="store_true", help="only redraw history.png from history.jsonl")
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"run_all: error: unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    history = [json.loads(ln) for ln in HISTORY.read_text().splitlines() if ln.strip()] if HISTORY.exists() else []
    failed = []
    if not args.plot_only:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "quick": args.quick,
            "machine": _machine(),
            "load_avg_1m_before": round(os.getloadavg()[0], 2),
        }
        for name in names:
            result = run_one(name, args.quick)
            if result is None:
                failed.append(name)
            entry[name] = result
        if not args.no_record:
            with HISTORY.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            history.append(entry)
            print(f"appended to {HISTORY.relative_to(ROOT)}")
    if history and plot(history):
        print(f"plot: {PLOT.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
