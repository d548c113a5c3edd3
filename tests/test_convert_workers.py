"""convert's worker processes: forked before any thread of ours starts, and a worker that dies (the OOM
killer, kill -9) ends the run at once with one line naming what it held, the dataset folder as it was."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamtrain import convert as cv
from streamtrain import dataset

_THREADS_AT_FORK = r"""
import json, os, sys, threading
from streamtrain.convert import ConvertProgress, convert

threads_at_fork = []
os.register_at_fork(before=lambda: threads_at_fork.append(threading.active_count()))


class ThreadedProgress(ConvertProgress):
    # Like the CLI's rich bar, whose refresh thread starts in start().
    def start(self, total_bytes, total_files, reused_bytes):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.stop.wait, daemon=True)
        self.thread.start()

    def finish(self):
        self.stop.set()
        self.thread.join()


convert([sys.argv[1]], sys.argv[2], workers=2, shard_mb=0.01, progress=ThreadedProgress())
print(json.dumps(threads_at_fork))
"""


def _big_jsonl(path: Path, num_lines: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lines = [json.dumps(np.round(rng.standard_normal((int(rng.integers(2, 12)), 4)), 6).tolist())
             for _ in range(num_lines)]
    path.write_text("\n".join(lines) + "\n")


def test_workers_are_forked_before_any_thread_starts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        _big_jsonl(src / f"f{i}.jsonl", 100, seed=i)
    p = subprocess.run([sys.executable, "-c", _THREADS_AT_FORK, str(src), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    threads_at_fork = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(threads_at_fork) == 2  # one fork per worker
    assert threads_at_fork == [1, 1]  # only the main thread: the progress thread starts after
    assert dataset.verify_dataset(dataset.read_index(tmp_path / "out")) == []


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("shard_mb, task, lost", [
    # 8 groups of 256 KiB, one task each: task 3 holds group 4, the nominal bytes 3 * 256 KiB to 4 * 256 KiB.
    (0.25, 3, "group 4 of 8 ({src} bytes 786432-1048576)"),
    # One group of 2 MB cut into 256 KiB partials, one task each (fewer groups than workers can share).
    (4, 2, "piece 3 of 8 of group 1 of 1 ({src})"),
])
def test_a_killed_worker_ends_the_run_naming_what_it_held(tmp_path, shard_mb, task, lost):
    src = tmp_path / "big.jsonl"
    _big_jsonl(src, 6900)
    assert 1_900_000 < src.stat().st_size < 2 * 2**20
    out = tmp_path / "out"
    cv.convert([src], out, workers=1, shard_mb=shard_mb)
    with open(src, "a") as f:  # a changed input: every group is converted again
        f.write("[[1, 2, 3, 4], [5, 6, 7, 8]]\n")
    before = _tree(out)
    started = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "streamtrain", "convert", str(src), "--out", str(out), "--workers", "2",
         "--shard-mb", str(shard_mb)],
        env={**__import__("os").environ, "STREAMTRAIN_TEST_KILL_TASK": str(task)},
        capture_output=True, text=True, timeout=120,  # a hang (waiting for the lost result) fails here
    )
    assert time.monotonic() - started < 60
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "was killed by signal 9 (SIGKILL) while converting " + lost.format(src=src) in p.stderr
    assert "nothing was committed" in p.stderr
    assert _tree(out) == before  # no staging folder, no new shard: the previous dataset, byte for byte
    assert dataset.verify_dataset(dataset.read_index(out)) == []
    r = cv.convert([src], out, workers=2, shard_mb=shard_mb)
    assert r.num_sequences == 6901 and dataset.verify_dataset(dataset.read_index(out)) == []
