"""`streamtrain convert` through the command line: exit codes, one-line errors, summary, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from streamtrain import cli


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "streamtrain", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_convert_summary_and_inspect(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("[[1,2,3],[4,5,6]]\n[[1,2,3]]\n[[0,0,0],[1,1,1],[2,2,2]]\n")
    (tmp_path / "src" / "README").write_text("x")
    assert cli.main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "ds"), "--on-error", "skip", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "kept 2 sequences, rejected 1, ignored 1 files (3 records" in out and "rejects.jsonl" in out
    assert cli.main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "ds"), "--on-error", "skip", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["inspect", str(tmp_path / "ds"), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert (obj["num_sequences"], obj["num_tokens"], obj["dim"], obj["num_rejected"]) == (2, 5, 3, 1)


@pytest.mark.parametrize("args, message", [
    (["convert", "{tmp}/missing", "--out", "{tmp}/ds"], "no such file or folder"),
    (["convert", "{tmp}/empty", "--out", "{tmp}/ds"], "no .json or .jsonl files"),
    (["convert", "{tmp}/src", "--out", "{tmp}/ds", "--dim", "0"], "--dim must be >= 1"),
    (["convert", "{tmp}/src", "--out", "{tmp}/ds", "--dim", "4"], "has 3 values, expected 4"),
    (["convert", "{tmp}/src", "--out", "{tmp}/ds", "--workers", "0"], "--workers must be >= 1"),
    (["convert", "{tmp}/src", "--out", "{tmp}/ds", "--shard-mb", "inf"], "--shard-mb must be a finite number > 0"),
    (["convert", "{tmp}/src", "--out", "{tmp}/ds", "--shard-mb", "nan"], "--shard-mb must be a finite number > 0"),
    (["convert", "{tmp}/src", "--out", "{tmp}/ds", "--shard-mb", "0"], "--shard-mb must be a finite number > 0"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("[[1,2,3],[4,5,6]]\n")
    p = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("streamtrain convert: error: ") and message in p.stderr
    assert not (tmp_path / "ds" / "index.json").exists()


def test_unreadable_index_exits_2_and_keeps_the_dataset(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("[[1,2,3],[4,5,6]]\n" * 3)
    assert _cli("convert", tmp_path / "src", "--out", tmp_path / "ds").returncode == 0
    raw = json.loads((tmp_path / "ds" / "index.json").read_text())
    raw["format_version"] = "1"
    (tmp_path / "ds" / "index.json").write_text(json.dumps(raw))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "ds").rglob("*"))
    p = _cli("convert", tmp_path / "src", "--out", tmp_path / "ds")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "'format_version' must be an integer" in p.stderr and "use --force to rebuild" in p.stderr
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "ds").rglob("*")) == before
    p = _cli("convert", tmp_path / "src", "--out", tmp_path / "ds", "--force", "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "ds" / "index.json").read_text())["num_sequences"] == 3


@pytest.mark.slow
def test_convert_never_imports_torch(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("[[1,2,3],[4,5,6]]\n" * 5)
    code = ("import sys, streamtrain.cli; rc = streamtrain.cli.main(['convert', sys.argv[1], '--out', sys.argv[2], '--workers', '2']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "src"), str(tmp_path / "ds")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
