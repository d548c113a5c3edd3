"""A full disk (ENOSPC, or EDQUOT) while convert or DatasetWriter writes: one line naming the file that could
not be written, exit 2, the previous dataset intact, nothing left behind.

The real thing is a 2 MiB tmpfs (root can mount one, and CI runs as root); where mounting fails the same
tests inject ENOSPC at fsync instead, and warn that they did. The per-file tests always inject, to reach each
file of the commit in turn."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import write_dataset

from streamtrain import cli, dataset
from streamtrain import convert as cv


class SmallDisk:
    def __init__(self, folder: Path, how: str, monkeypatch) -> None:
        self.folder, self.how, self._monkeypatch = folder, how, monkeypatch

    def fill(self) -> None:
        """From now on the disk is full: a no-op on the tmpfs (the test's writes fill it); injected, every
        shard write fails from here on."""
        if self.how == "injected":
            _inject(self._monkeypatch, r"^\.shard-")


@pytest.fixture
def small_disk(tmp_path, monkeypatch, record_property):
    """A folder on a 2 MiB tmpfs; or, where none can be mounted, a plain folder whose shard writes fail with
    ENOSPC once `fill()` is called (with a warning saying so)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    p = subprocess.run([mount, "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                       text=True) if mount else None
    if p is None or p.returncode != 0:
        reason = p.stderr.strip() if p is not None else "no mount command"
        warnings.warn(f"cannot mount a tmpfs ({reason}): ENOSPC is injected instead of a real full disk")
        record_property("full_disk", "injected")
        yield SmallDisk(disk, "injected", monkeypatch)
        return
    record_property("full_disk", "tmpfs")
    try:
        yield SmallDisk(disk, "tmpfs", monkeypatch)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _inject(monkeypatch, name_pattern: str, code: int = errno.ENOSPC) -> None:
    """fsync of a file whose name matches `name_pattern` fails with `code`, as a full disk would make it
    (with delayed allocation the error comes at fsync). Forked workers inherit it."""
    real_fsync = os.fsync

    def fsync(fd):
        if re.search(name_pattern, os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _jsonl(path: Path, num_lines: int, seed: int, bad_every: int = 0) -> None:
    """One-hot-like integer vectors: 2 bytes of text per value, 4 bytes once stored, so the shards outgrow
    the input."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_lines):
        if bad_every and i % bad_every == 1:
            lines.append("[[1, 2]]")
            continue
        v = rng.integers(0, 2, size=(int(rng.integers(2, 40)), 28))
        lines.append("[" + ",".join("[" + ",".join(map(str, row)) + "]" for row in v) + "]")
    path.write_text("\n".join(lines) + "\n")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("workers, shard_mb", [(2, 0.25), (2, 4), (1, 0.25)])
def test_convert_on_a_full_disk_names_the_file_and_keeps_the_dataset(tmp_path, small_disk, capsys, workers, shard_mb):
    out = small_disk.folder / "ds"
    _jsonl(tmp_path / "small.jsonl", 40, seed=1, bad_every=9)
    assert cv.convert([tmp_path / "small.jsonl"], out, workers=1, on_error="skip").num_rejected > 0
    before = _tree(out)
    small_disk.fill()
    _jsonl(tmp_path / "big.jsonl", 1600, seed=2)  # ~1.8 MB of text, ~3.6 MB of shards
    rc = cli.main(["convert", str(tmp_path / "big.jsonl"), "--out", str(out), "--workers", str(workers),
                   "--shard-mb", str(shard_mb), "--on-error", "skip"])
    err = _one_line(capsys.readouterr().err)
    assert rc == 2, err
    assert re.match(rf"streamtrain convert: error: {re.escape(str(out))}/\S+: cannot write: the disk is full "
                    r"\(No space left on device\); nothing was committed", err), err
    assert _tree(out) == before  # same index, shards, lengths, manifest and rejects; no staging left
    assert dataset.verify_dataset(dataset.read_index(out)) == []
    print(f"full disk: {small_disk.how}")


# Temp-file name of each file convert writes -> the file the message names.
_CONVERT_FILES = {
    "shard": (r"^\.shard-", r"/\.staging-\w+/shard-\w+-\d+\.arrow"),
    "lengths": (r"^\.lengths-", r"/lengths-\w+\.npy"),
    "manifest": (r"^\.sources-", r"/sources-\w+\.json"),
    "rejects": (r"^\.rejects\.jsonl\.", r"/\.staging-\w+/rejects\.jsonl"),
    "index": (r"^\.index\.json\.", r"/index\.json"),
}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("target", sorted(_CONVERT_FILES))
def test_convert_names_each_file_it_cannot_write(tmp_path, monkeypatch, target, code):
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(src / "a.jsonl", 30, seed=3, bad_every=7)
    out = tmp_path / "ds"
    cv.convert([src], out, workers=1, on_error="skip", shard_mb=0.01)
    before = _tree(out)
    _jsonl(src / "a.jsonl", 40, seed=4, bad_every=5)
    pattern, named = _CONVERT_FILES[target]
    _inject(monkeypatch, pattern, code)
    with pytest.raises(dataset.DiskFullError) as e:
        cv.convert([src], out, workers=1, on_error="skip", shard_mb=0.01)
    message = str(e.value)
    assert "\n" not in message
    assert re.match(rf"{re.escape(str(out))}{named}: cannot write: the disk is full \({os.strerror(code)}\); "
                    rf"nothing was committed, {re.escape(str(out))} is as it was$", message), message
    assert _tree(out) == before
    assert dataset.verify_dataset(dataset.read_index(out)) == []


def _sequences(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(50, 200)), 28)).astype(np.float32) for _ in range(n)]


def test_dataset_writer_on_a_full_disk_keeps_the_dataset(small_disk):
    root = small_disk.folder / "ds"
    old = write_dataset(root, _sequences(10, 5), shard_bytes=100_000)
    before = _tree(root)
    small_disk.fill()
    with pytest.raises(dataset.DiskFullError) as e:
        write_dataset(root, _sequences(150, 6), shard_bytes=200_000)  # ~10 MB
    assert re.match(rf"{re.escape(str(root))}/\.staging-\w+/shard-\w+-\d+\.arrow: cannot write: the disk is full "
                    rf"\(No space left on device\); nothing was written to {re.escape(str(root))}, its previous "
                    "content is intact$", str(e.value)), str(e.value)
    assert _tree(root) == before
    assert dataset.verify_dataset(dataset.read_index(root)) == [] and dataset.read_index(root).shards == old.shards
    print(f"full disk: {small_disk.how}")


@pytest.mark.parametrize("target, pattern, named", [
    ("shard", r"^\.shard-", r"/\.staging-\w+/shard-\w+-\d+\.arrow"),
    ("lengths", r"^\.lengths-", r"/lengths-\w+\.npy"),
    ("index", r"^\.index\.json\.", r"/index\.json"),
])
def test_dataset_writer_names_each_file_it_cannot_write(tmp_path, monkeypatch, target, pattern, named):
    root = tmp_path / "ds"
    write_dataset(root, _sequences(10, 7), shard_bytes=50_000)
    before = _tree(root)
    _inject(monkeypatch, pattern)
    with pytest.raises(dataset.DiskFullError, match=rf"^{re.escape(str(root))}{named}: cannot write: the disk is full"):
        write_dataset(root, _sequences(12, 8), shard_bytes=50_000)
    assert _tree(root) == before
    assert dataset.verify_dataset(dataset.read_index(root)) == []
