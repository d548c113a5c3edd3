"""convert's input discovery: unreadable folders and files are named, hidden entries are ignored."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from streamtrain import convert as cv

NOBODY = 65534

# Runs `streamtrain convert` as an unprivileged user: as root (CI), it first drops to uid/gid 65534, since
# root reads a chmod 000 folder anyway; as a normal user the chmod alone blocks it.
_CONVERT_UNPRIVILEGED = r"""
import os, sys
# Everything imported first: the interpreter's own files may be out of that user's reach (under /root).
import streamtrain.cli, streamtrain.convert
streamtrain.cli.build_parser()
streamtrain.convert.parser_backend()
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
blocked = sys.argv[1]
if os.access(blocked, os.R_OK):
    print(f"{blocked} is still readable: the test cannot block it", file=sys.stderr)
    sys.exit(99)
sys.exit(streamtrain.cli.main(["convert", *sys.argv[2:]]))
"""


@pytest.fixture
def shared_tree():
    """A folder that uid 65534 can reach (pytest's tmp_path is private to its user), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="streamtrain-walk-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for p in [base, *base.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(base)


def _readable_tree(base: Path) -> Path:
    src = base / "src"
    (src / "ok").mkdir(parents=True)
    (src / "ok" / "a.jsonl").write_text("[[1, 2], [3, 4]]\n")
    (src / "z.jsonl").write_text("[[5, 6], [7, 8]]\n")
    for p in [src, *src.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return src


@pytest.mark.parametrize("what", ["folder", "file"])
def test_unreadable_folder_or_file_is_an_error_naming_it(shared_tree, what):
    src = _readable_tree(shared_tree)
    if what == "folder":
        blocked = src / "blocked"
        blocked.mkdir()
        (blocked / "b.jsonl").write_text("[[1, 2], [3, 4]]\n")
        (blocked / "b.jsonl").chmod(0o644)
    else:
        blocked = src / "ok" / "b.jsonl"
        blocked.write_text("[[1, 2], [3, 4]]\n")
    blocked.chmod(0)
    out = shared_tree / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    p = subprocess.run([sys.executable, "-c", _CONVERT_UNPRIVILEGED, str(blocked), str(src), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith(f"streamtrain convert: error: {blocked}: cannot read")
    assert "Permission denied" in p.stderr
    assert not (out / "index.json").exists()


def test_hidden_files_and_folders_are_ignored_unless_named(tmp_path):
    src = tmp_path / "src"
    (src / ".git" / "objects").mkdir(parents=True)
    (src / ".git" / "objects" / "x.json").write_text("[[9, 9], [9, 9]]")
    (src / "sub").mkdir()
    (src / "a.jsonl").write_text("[[1, 2], [3, 4]]\n")
    (src / "sub" / "b.json").write_text("[[5, 6], [7, 8]]")
    (src / "._a.jsonl").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble
    (src / ".a.jsonl.swp").write_bytes(b"b0VIM 9.0")
    (src / ".manifest.json").write_text('{"tool": "corpus"}')
    (src / "sub" / ".hidden.jsonl").write_text("[[0, 0], [0, 0]]\n")
    (src / "notes.txt").write_text("x")
    found, ignored = cv.list_sources([src])
    assert [Path(s.path).relative_to(src).as_posix() for s in found] == ["a.jsonl", "sub/b.json"]
    assert ignored == 6  # .git/ (unread), ._a.jsonl, .a.jsonl.swp, .manifest.json, sub/.hidden.jsonl, notes.txt
    r = cv.convert([src], tmp_path / "out", workers=1)
    assert (r.num_sequences, r.num_rejected, r.num_ignored_files) == (2, 0, 6)
    # Named on the command line, a hidden file is read, and a hidden folder is walked.
    r = cv.convert([src, src / "sub" / ".hidden.jsonl", src / ".git"], tmp_path / "out2", workers=1)
    assert (r.num_sequences, r.num_files) == (4, 4)

