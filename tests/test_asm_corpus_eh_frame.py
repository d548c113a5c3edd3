"""tools/asm_corpus/eh_frame.py and elf.py: function ranges from .eh_frame, ELF detection."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from asm_corpus_support import SMALL_BINARIES, ac, needs_corpus

HAVE_READELF = shutil.which("readelf") is not None


@needs_corpus
def test_functions_from_eh_frame_matches_readelf():
    path = SMALL_BINARIES[0]
    ranges = ac.functions_from_eh_frame(path)
    assert len(ranges) > 5
    assert ranges == sorted(set(ranges))
    assert all(start < end for start, end in ranges)
    if not HAVE_READELF:
        pytest.skip("readelf (binutils) is not installed")
    text = subprocess.run(["readelf", "--debug-dump=frames", path], capture_output=True, text=True, check=True).stdout
    expected = {
        (int(a, 16), int(b, 16))
        for a, b in re.findall(r"FDE cie=\w+ pc=([0-9a-f]+)\.\.([0-9a-f]+)", text)
        if int(b, 16) > int(a, 16)
    }
    assert set(ranges) == expected


@needs_corpus
def test_functions_found_without_section_headers(tmp_path):
    # sstrip-style binaries have no section table; .eh_frame is then found via
    # PT_GNU_EH_FRAME (.eh_frame_hdr) and code via executable segments.
    original = SMALL_BINARIES[0]
    stripped = tmp_path / "no_sections"
    data = bytearray(Path(original).read_bytes())
    struct.pack_into("<Q", data, 0x28, 0)  # e_shoff
    struct.pack_into("<HH", data, 0x3C, 0, 0)  # e_shnum, e_shstrndx
    stripped.write_bytes(bytes(data))
    ranges = ac.functions_from_eh_frame(original)
    assert len(ranges) > 5
    assert ac.functions_from_eh_frame(stripped) == ranges


def test_not_elf_is_rejected(tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    assert not ac.is_x86_64_elf(script)
    with pytest.raises(ac.CorpusError):
        ac.functions_from_eh_frame(script)
