"""tools/asm_corpus/cli.py: user errors (one line, exit 2), --check, and ``python -m tools.asm_corpus``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from asm_corpus_support import (
    HAVE_CORPUS,
    ROOT,
    SMALL_BINARIES,
    ac,
    needs_corpus,
    read_records,
)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "argv_tail,fragment",
    [
        (["--binaries", "/nonexistent/asm_corpus_binary"], "no such file"),
        (["--split", "1.5"], "--split"),
        (["--max-mb", "0"], "--max-mb"),
        (["--test-split", "-0.1"], "--test-split"),
        (["--split", "0.5", "--test-split", "0.5"], "--split + --test-split"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, argv_tail, fragment):
    assert ac.main(["--out", str(tmp_path / "c")] + argv_tail) == 2
    assert fragment in _one_line_error(capsys)


def test_cli_rejects_non_elf_and_non_empty_out(tmp_path, capsys):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    assert ac.main(["--out", str(tmp_path / "c"), "--binaries", str(script)]) == 2
    assert "not an x86-64 ELF" in _one_line_error(capsys)
    # A folder of binaries is scanned without an ELF check, so this reaches the output folder on any machine.
    (tmp_path / "no_binaries").mkdir()
    assert ac.main(["--out", str(tmp_path), "--binaries", str(tmp_path / "no_binaries")]) == 2
    assert "not empty" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_binaries", "script.sh"]  # left alone


def test_cli_bad_flag_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        ac.main(["--out", str(tmp_path), "--format", "xml"])
    assert excinfo.value.code == 2
    _one_line_error(capsys)


def test_cli_check_and_missing_out(capsys):
    assert ac.main(["--check"]) == (0 if HAVE_CORPUS else 1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        ac.main(["--max-mb", "1"])
    assert excinfo.value.code == 2
    assert "--out" in _one_line_error(capsys)


@needs_corpus
def test_cli_module_end_to_end(tmp_path):
    out = tmp_path / "c"
    completed = subprocess.run(
        # env and echo: two different programs, together well under the 5 MB budget.
        [sys.executable, "-m", "tools.asm_corpus", "--out", str(out), "--max-mb", "5", "--seed", "5", "--format", "json",
         "--binaries", *SMALL_BINARIES[2:4], "--split", "0.5"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    assert "p50=" in completed.stdout and "p99=" in completed.stdout
    manifest = json.loads((out / ".manifest.json").read_text())
    assert manifest["format"] == "json" and manifest["seed"] == 5
    assert len(manifest["split"]["train"]) == len(manifest["split"]["val"]) == 1
    assert read_records(out)


@needs_corpus
def test_cli_test_split_writes_a_test_folder(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["--out", str(out), "--max-mb", "5", "--binaries", *SMALL_BINARIES[2:5]]
    argv += ["--split", "0.3", "--test-split", "0.3"]
    assert ac.main(argv) == 0
    assert "(1 val, 1 test)" in capsys.readouterr().out
    manifest = json.loads((out / ".manifest.json").read_text())
    assert manifest["split"]["test_fraction"] == 0.3
    assert len(manifest["split"]["train"]) == len(manifest["split"]["val"]) == len(manifest["split"]["test"]) == 1
    assert {p.name for p in (out / "test").iterdir()} == set(manifest["split"]["test"])
