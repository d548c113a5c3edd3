"""Convert throughput beside the stdlib json reader: each contender a fresh process (start-up included),
alternating so they share the machine's load; medians of the rounds. Never imports torch."""

from __future__ import annotations

import hashlib
import os
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

__all__ = ["STDLIB_READER", "run_timed", "measure_convert", "parse_floor_s", "write_floor_s", "convert_floors"]

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


def _records(corpus: Path):
    """The text of every record of the corpus: a .json file whole, each non-blank line of a .jsonl file."""
    for path in sorted(Path(corpus).rglob("*.json*")):
        data = path.read_bytes()
        if path.suffix == ".jsonl":
            yield from (line for line in data.split(b"\n") if line.strip())
        elif path.suffix == ".json":
            yield data


def _parse(texts: list[bytes]) -> None:
    import numpy as np

    try:
        import simdjson
    except ImportError:
        simdjson = None
    if simdjson is not None:
        parser = simdjson.Parser()
        for text in texts:
            doc = parser.parse(text)
            seq = doc["sequence"] if isinstance(doc, simdjson.Object) else doc
            np.frombuffer(seq.as_buffer(of_type="d"), dtype=np.float64).astype(np.float32)
            del doc, seq  # the parser is reused only once no proxy is alive
    else:
        import orjson

        for text in texts:
            value = orjson.loads(text)
            np.array(value["sequence"] if isinstance(value, dict) else value, dtype=np.float32)


def parse_floor_s(corpus: Path) -> float:
    """Seconds one core takes only to parse every record into float32, with the fastest parser here
    (pysimdjson's flat buffers, else orjson): no validation, no Arrow, no writing. A lower bound on what
    any converter of this corpus spends per core."""
    texts = list(_records(corpus))  # read first: the floor is parsing, not the page cache
    t0 = time.perf_counter()
    _parse(texts)
    return time.perf_counter() - t0


def write_floor_s(nbytes: int, folder: Path) -> float:
    """Seconds to write `nbytes` to a new file with sha256 and fsync, as every shard is written (index.json
    names each shard's sha256; a commit never points at unsynced data)."""
    chunk = os.urandom(1 << 20) * 8
    path = folder / "write-floor.bin"
    t0 = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            piece = chunk[: min(left, len(chunk))]
            digest.update(piece)
            f.write(piece)
            left -= len(piece)
        f.flush()
        os.fsync(f.fileno())
    took = time.perf_counter() - t0
    path.unlink()
    return took


def _timed_child(fn, args: tuple, barrier, spans, slot: int) -> None:
    prepare, work = fn(*args)  # prepare() is not timed (reading the corpus), work() is
    state = prepare()
    barrier.wait()
    t0 = time.perf_counter()
    work(state)
    spans[2 * slot], spans[2 * slot + 1] = t0, time.perf_counter()


def _concurrent_s(fn, args: tuple, workers: int) -> float:
    """Seconds per unit of work when `workers` forked processes run it at the same moment (fn(*args) gives
    (prepare, work); only work is timed): from the first start to the last end, over `workers`. This
    machine's real scaling across its cores (shared caches, memory bandwidth, the hypervisor), not an
    assumed perfect one."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)
    spans = ctx.Array("d", 2 * workers)
    procs = [ctx.Process(target=_timed_child, args=(fn, args, barrier, spans, k)) for k in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise UserError(f"bench: a floor measurement process failed (exit codes {[p.exitcode for p in procs]})")
    return (max(spans[1::2]) - min(spans[0::2])) / workers


def _parse_job(corpus: Path):
    return (lambda: list(_records(corpus))), _parse


def _write_job(nbytes: int, folder: Path):
    def prepare() -> Path:
        sub = Path(folder) / f"floor-{os.getpid()}"
        sub.mkdir()
        return sub

    def work(sub: Path) -> None:
        write_floor_s(nbytes, sub)
        sub.rmdir()

    return prepare, work


def convert_floors(corpus: Path, dataset: Path, work: Path, workers: int, stdlib_s: float, repeats: int) -> dict:
    """The limit this machine sets: interpreter and library start-up, plus parsing and writing as fast as
    `workers` processes doing only that get through them on this machine's cores. stdlib_s over that floor
    is the most any converter could show against the stdlib reader here."""
    out_bytes = sum(p.stat().st_size for p in Path(dataset).rglob("*") if p.is_file())
    startup = statistics.median(run_timed([sys.executable, "-c", "import numpy, pyarrow, streamtrain.convert"])[0]
                                for _ in range(max(repeats, 3)))
    parse_one = statistics.median(parse_floor_s(corpus) for _ in range(repeats))
    parse = statistics.median(_concurrent_s(_parse_job, (corpus,), workers) for _ in range(repeats))
    write = statistics.median(_concurrent_s(_write_job, (out_bytes, work), workers) for _ in range(repeats))
    floor = startup + parse + write
    return {
        "convert_floor_startup_s": startup,
        "convert_floor_parse_one_core_s": parse_one,
        "convert_floor_parse_s": parse,  # per corpus, with `workers` processes at once
        "convert_floor_write_s": write,
        "convert_output_bytes": out_bytes,
        "convert_floor_s": floor,
        "convert_vs_stdlib_ceiling": stdlib_s / floor,
    }


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
        "convert_s": med["convert"],
    }
    figures.update(convert_floors(corpus, out, work, workers, med["stdlib"], repeats))
    return figures, out
