"""Shared by the tests/test_asm_corpus_*.py files: the package, small system binaries, skip marks, corpus readers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tools/ is a package of the repository root, not an installed one
    sys.path.insert(0, str(ROOT))

from tools import asm_corpus as ac  # noqa: E402
from tools.asm_corpus import iced  # noqa: E402

HAVE_ICED = iced.iced_x86 is not None
HAVE_OBJDUMP = shutil.which("objdump") is not None
HAVE_CORPUS = ac.available()

_SMALL_PROGRAMS = ("true", "false", "env", "echo", "sleep", "yes", "basename", "dirname", "uname")


def _small_binaries() -> list[str]:
    found = []
    for name in _SMALL_PROGRAMS:
        path = shutil.which(name) or os.path.join("/usr/bin", name)
        if os.path.isfile(path) and ac.is_x86_64_elf(path) and os.path.realpath(path) not in found:
            found.append(os.path.realpath(path))
    return found


SMALL_BINARIES = _small_binaries()

needs_corpus = pytest.mark.skipif(
    not HAVE_CORPUS or len(SMALL_BINARIES) < 4,
    reason="needs x86-64 ELF system binaries (/usr/bin) and a decoder (iced-x86 or objdump)",
)
needs_iced = pytest.mark.skipif(not HAVE_ICED, reason="iced-x86 not installed (pip install iced-x86)")
needs_objdump = pytest.mark.skipif(not HAVE_OBJDUMP, reason="objdump (binutils) not installed")

DECODERS = [
    pytest.param("iced", marks=needs_iced),
    pytest.param("objdump", marks=needs_objdump),
]


def read_records(root: Path) -> dict[str, list[list[list[float]]]]:
    """Parse every data file under root -> {"split/binary": [sequence, ...]}, checking the format."""
    result: dict[str, list] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name == ".manifest.json":
            continue
        key = f"{path.parent.parent.name}/{path.parent.name}"
        text = path.read_text(encoding="ascii")
        if path.suffix == ".jsonl":
            lines = text.splitlines()
            assert lines and all(line.strip() for line in lines)
            parsed = [json.loads(line) for line in lines]
        else:
            assert path.suffix == ".json"
            parsed = [json.loads(text)]
        for record in parsed:
            sequence = record["sequence"] if isinstance(record, dict) else record
            if isinstance(record, dict):
                assert set(record) == {"sequence"}
            assert isinstance(sequence, list) and len(sequence) >= 2
            for vector in sequence:
                assert len(vector) == 28
                assert all(type(x) in (int, float) for x in vector)
            result.setdefault(key, []).append(sequence)
    return result


def digest(sequence) -> str:
    return hashlib.sha256(np.asarray(sequence, dtype=np.float32).tobytes()).hexdigest()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
