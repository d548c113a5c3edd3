"""Fault suite for convert: kill -9 at seeded random moments of a run (spread over the whole run, from
parsing through staging and the commit), and at the commit's named stages through the crash hooks.

After each kill: if index.json exists, the dataset it describes is complete (verify_dataset finds nothing) and
is either the previous one or the new one, never a mix. A rerun on the same folder then gives exactly what a
clean run gives (same shard checksums, lengths, statistics, rejects: only the random file tokens differ) and
leaves no garbage behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from streamtrain import convert as cv
from streamtrain import dataset

SHARD_MB = 0.25


def _corpus(src: Path, seed: int) -> None:
    """About 2.5 MB in several files (so about 10 groups of SHARD_MB), with rejects and an empty file."""
    rng = np.random.default_rng(seed)
    (src / "sub").mkdir(parents=True)
    for f in range(5):
        lines = []
        for i in range(1200):
            if f in (0, 3) and i % 300 == 5:
                lines.append("[[1, 2, 3], [4, 5]]")
                continue
            v = np.round(rng.standard_normal((int(rng.integers(2, 30)), 3)), 5)
            lines.append(json.dumps({"sequence": v.tolist()}) if i % 3 else json.dumps(v.tolist()))
        (src / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    for f in range(40):
        v = np.round(rng.standard_normal((int(rng.integers(2, 30)), 3)), 5)
        (src / "sub" / f"fn-{f:03d}.json").write_text(json.dumps(v.tolist()))
    (src / "sub" / "fn-empty.json").write_text("")


def _content(out: Path):
    index = dataset.read_index(out)
    rejects = (out / dataset.REJECTS_FILE).read_bytes() if (out / dataset.REJECTS_FILE).exists() else b""
    return (index.dim, [s.sha256 for s in index.shards], index.lengths().tobytes(), index.mean.tobytes(),
            index.std.tobytes(), index.num_rejected, index.extra["num_records"], rejects)


def _no_garbage(out: Path) -> None:
    index = dataset.read_index(out)
    expected = {s.file for s in index.shards} | {index.lengths_file, index.extra["convert"]["manifest"],
                                                  dataset.INDEX_FILE, dataset.LOCK_FILE}
    if index.num_rejected:
        expected.add(dataset.REJECTS_FILE)
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == expected
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_dir()} == {dataset.SHARD_DIR}


def _start(src: Path, out: Path, workers: int, env: dict | None = None) -> int:
    """A child process (forked, so it starts converting at once, without an interpreter start) running one
    convert in its own process group; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            os.environ.update(env or {})
            cv.convert([src], out, workers=workers, on_error="skip", shard_mb=SHARD_MB)
            code = 0
        finally:
            os._exit(code)
    try:
        os.setpgid(pid, pid)  # here too, so that a kill right after the fork already reaches the group
    except (PermissionError, ProcessLookupError):
        pass  # the child did it first, or has ended
    return pid


def _kill(pid: int, delay_s: float) -> bool:
    """SIGKILL the child's whole process group `delay_s` after it started; False when it had already ended."""
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return False
        time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == -signal.SIGKILL


def _wait_for_the_lock(out: Path, timeout_s: float = 10) -> None:
    """Wait until no process holds the folder's lock: a killed run's workers hold it until they have ended
    (they die with it, but a moment later)."""
    if not (out / dataset.LOCK_FILE).exists():
        return
    deadline = time.monotonic() + timeout_s
    with open(out / dataset.LOCK_FILE, "rb") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the killed run's workers still hold the lock"
                time.sleep(0.005)


def _run_to_end(pid: int, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("convert did not finish: hung")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two inputs, the previous dataset (of the first), and what a clean run of the second gives."""
    root = tmp_path_factory.mktemp("faults")
    old_src, src = root / "old_src", root / "src"
    _corpus(old_src, seed=1)
    _corpus(src, seed=2)
    previous = root / "previous"
    cv.convert([old_src], previous, workers=1, on_error="skip", shard_mb=SHARD_MB)
    clean = root / "clean"
    r = cv.convert([src], clean, workers=1, on_error="skip", shard_mb=SHARD_MB)
    assert r.groups_built >= 8 and r.num_rejected >= 8
    # How long a run takes from the fork (the median of three, with one and with two workers), for spreading
    # the kills over it.
    duration_s = {}
    for workers in (1, 2):
        timings = []
        for _ in range(3):
            scratch = root / f"timing-{workers}"
            started = time.monotonic()
            assert _run_to_end(_start(src, scratch, workers)) == 0
            timings.append(time.monotonic() - started)
            assert _content(scratch) == _content(clean)
            shutil.rmtree(scratch)
        duration_s[workers] = sorted(timings)[1]
    return {"src": src, "previous": previous, "previous_content": _content(previous),
            "clean_content": _content(clean), "duration_s": duration_s, "root": root}


def _one_fault(corpus, out: Path, workers: int, with_previous: bool, delay_s: float | None, env=None) -> bool:
    """One run killed after `delay_s` (None: let the crash hook end it); checks the folder after the kill and
    after a rerun. Returns whether the run was cut short."""
    shutil.rmtree(out, ignore_errors=True)
    if with_previous:
        shutil.copytree(corpus["previous"], out)
    pid = _start(corpus["src"], out, workers, env)
    if delay_s is None:
        cut = _run_to_end(pid) == 86
        assert cut
    else:
        cut = _kill(pid, delay_s)
    _wait_for_the_lock(out)
    if dataset.is_dataset(out):
        index = dataset.read_index(out)
        assert dataset.verify_dataset(index) == [], (delay_s, env)
        allowed = [corpus["clean_content"]] + ([corpus["previous_content"]] if with_previous else [])
        assert _content(out)[:7] in [c[:7] for c in allowed], (delay_s, env)
    else:
        assert not with_previous, "the previous dataset's index.json vanished"
    cv.convert([corpus["src"]], out, workers=workers, on_error="skip", shard_mb=SHARD_MB)
    assert _content(out) == corpus["clean_content"], (delay_s, env)
    _no_garbage(out)
    return cut


def _random_faults(corpus, num_moments: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    out = corpus["root"] / f"out-{seed}"
    fractions = rng.uniform(0.0, 0.95, size=num_moments)  # of the run's measured duration
    cut = []
    for k, f in enumerate(fractions):
        workers = 1 + k % 2
        cut.append(_one_fault(corpus, out, workers, with_previous=bool(k % 3),
                              delay_s=float(f * corpus["duration_s"][workers])))
    # Kills spread over the run cut most runs short; on a busy machine timings wander, and a run that ended
    # before its kill still checks the rerun.
    assert sum(cut) >= num_moments / 3, cut


def test_kill_9_at_random_moments_never_breaks_the_dataset(corpus):
    _random_faults(corpus, num_moments=24, seed=0)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("hook", [{"STREAMTRAIN_TEST_CRASH_AFTER_SHARDS": "1"},
                                  {"STREAMTRAIN_TEST_CRASH_AFTER_SHARDS": "5"},
                                  {"STREAMTRAIN_TEST_CRASH_AT": "before-index"},
                                  {"STREAMTRAIN_TEST_CRASH_AT": "after-index"}])
def test_kill_at_each_commit_stage(corpus, tmp_path, hook, workers):
    for with_previous in (False, True):
        _one_fault(corpus, tmp_path / "out", workers, with_previous, None, hook)


@pytest.mark.slow
def test_kill_9_at_many_more_random_moments(corpus):
    _random_faults(corpus, num_moments=100, seed=1)
