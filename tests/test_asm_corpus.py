"""Tests for tools/asm_corpus.py: instruction encoding, .eh_frame parsing, corpus layout.

The encoding tests check hand-derived field values for well-known instructions
with both decoders (iced-x86 and the objdump fallback).  The corpus tests build
tiny corpora from small coreutils binaries, so the whole file runs in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

_TOOL_PATH = Path(__file__).resolve().parents[1] / "tools" / "asm_corpus.py"


def _load_tool():
    # tools/ is not a package; register the module before executing it so that
    # dataclasses and pickling (used by the worker pool) can find it by name.
    spec = importlib.util.spec_from_file_location("asm_corpus", _TOOL_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["asm_corpus"] = module
    spec.loader.exec_module(module)
    return module


ac = _load_tool()

HAVE_ICED = ac.iced_x86 is not None
HAVE_OBJDUMP = shutil.which("objdump") is not None
HAVE_READELF = shutil.which("readelf") is not None
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

F = {name: i for i, name in enumerate(ac.FIELD_NAMES)}


def _f32(value: float) -> np.float32:
    """The stored value for a field: rounded to 4 decimals, then float32."""
    return np.float32(round(value, 4))


def _slog(value: int, divisor: float) -> float:
    return math.copysign(math.log2(1 + abs(value)) / divisor, value) if value else 0.0


# --------------------------------------------------------------------------
# Field layout.
# --------------------------------------------------------------------------


def test_field_names_are_28_unique_and_documented():
    assert ac.N_FIELDS == 28 == len(ac.FIELD_NAMES) == len(set(ac.FIELD_NAMES))
    assert len(ac.CLASS_NAMES) == 12
    assert ac.FIELD_NAMES[:12] == tuple(f"class_{c}" for c in ac.CLASS_NAMES)
    for name in ac.FIELD_NAMES[12:]:
        assert name in ac.__doc__, f"{name} is not described in the module docstring"


# --------------------------------------------------------------------------
# Hand-checked instruction vectors.
# --------------------------------------------------------------------------

# (description, bytes, class, {field: exact value before float32 rounding}).
# Every field not listed must be 0, so each case pins the full 28-vector.
_LEN = "length_bytes_div15"
_OPB = "operand_bytes_log2p1_div8"
_MEMB = "memory_bytes_log2p1_div8"
_REG = "register_operand_count_div4"
_OPS = "operand_count_div4"
_DISP = "displacement_slog2_div32"
_IMM = "immediate_slog2_div64"
_RD, _WR = "memory_read", "memory_write"
_RF, _WF = "reads_flags", "writes_flags"
KNOWN_INSTRUCTIONS = [
    ("mov rax,rbx", "4889d8", "move", {_OPS: 0.5, _REG: 0.5, _OPB: 0.5, _LEN: 3 / 15}),
    (
        "mov rax,[rip+0x10]",
        "488b0510000000",
        "move",
        {_OPS: 0.5, _REG: 0.25, _RD: 1, "rip_relative": 1, _DISP: _slog(16, 32), _MEMB: 0.5, _OPB: 0.5, _LEN: 7 / 15},
    ),
    (
        "add rax,8",
        "4883c008",
        "arith",
        {_OPS: 0.5, _REG: 0.25, "has_immediate": 1, _IMM: _slog(8, 64), _OPB: 0.5, _WF: 1, _LEN: 4 / 15},
    ),
    (
        "add rax,-8 (sign-extended imm8)",
        "4883c0f8",
        "arith",
        {_OPS: 0.5, _REG: 0.25, "has_immediate": 1, _IMM: _slog(-8, 64), _OPB: 0.5, _WF: 1, _LEN: 4 / 15},
    ),
    # call pushes the return address: an implicit 8-byte stack write.
    (
        "call rel32 +0x10",
        "e810000000",
        "call",
        {_OPS: 0.25, _WR: 1, _DISP: _slog(16, 32), _MEMB: 0.5, _OPB: 0.5, _LEN: 5 / 15},
    ),
    ("ret", "c3", "return", {_RD: 1, _MEMB: 0.5, _LEN: 1 / 15}),
    ("je short +5", "7405", "cond_branch", {_OPS: 0.25, _DISP: _slog(5, 32), _OPB: 0.5, _RF: 1, _LEN: 2 / 15}),
    ("jne short -2 (loop)", "75fe", "cond_branch", {_OPS: 0.25, _DISP: _slog(-2, 32), _OPB: 0.5, _RF: 1, _LEN: 2 / 15}),
    ("je near +0x100", "0f8400010000", "cond_branch", {_OPS: 0.25, _DISP: _slog(256, 32), _OPB: 0.5, _RF: 1, _LEN: 0.4}),
    # lea computes an address: a memory operand but no memory access.
    ("lea rax,[rsp+8]", "488d442408", "arith", {_OPS: 0.5, _REG: 0.25, _DISP: _slog(8, 32), _OPB: 0.5, _LEN: 5 / 15}),
    ("pxor xmm0,xmm0", "660fefc0", "simd", {_OPS: 0.5, _REG: 0.5, _OPB: 5 / 8, "vector_register": 1, _LEN: 4 / 15}),
    ("vxorps xmm0,xmm0,xmm0", "c5f857c0", "simd", {_OPS: 0.75, _REG: 0.75, _OPB: 5 / 8, "vector_register": 1, _LEN: 4 / 15}),
    ("push rbp", "55", "move", {_OPS: 0.25, _REG: 0.25, _WR: 1, _MEMB: 0.5, _OPB: 0.5, _LEN: 1 / 15}),
    ("pop rbp", "5d", "move", {_OPS: 0.25, _REG: 0.25, _RD: 1, _MEMB: 0.5, _OPB: 0.5, _LEN: 1 / 15}),
    ("nop", "90", "nop_padding", {_LEN: 1 / 15}),
    # nop dword [rax+rax*1+0]: has a memory operand that is never accessed.
    ("nop dword [rax+rax+0]", "0f1f440000", "nop_padding", {_OPS: 0.25, "has_index": 1, _OPB: 3 / 8, _LEN: 5 / 15}),
    ("endbr64", "f30f1efa", "nop_padding", {_LEN: 4 / 15}),
    (
        "mov [rdi+rcx*8-8],rax",
        "488944cff8",
        "move",
        {
            _OPS: 0.5, _REG: 0.25, _WR: 1, "has_index": 1, "index_scale_log2_div4": 0.75,
            _DISP: _slog(-8, 32), _MEMB: 0.5, _OPB: 0.5, _LEN: 5 / 15,
        },
    ),
    (
        "cmp byte [rdi],0x80",
        "803f80",
        "compare_test_set",
        {_OPS: 0.5, "has_immediate": 1, _IMM: _slog(-128, 64), _RD: 1, _MEMB: 1 / 8, _OPB: 1 / 8, _WF: 1, _LEN: 0.2},
    ),
    ("sete al", "0f94c0", "compare_test_set", {_OPS: 0.25, _REG: 0.25, _OPB: 1 / 8, _RF: 1, _LEN: 3 / 15}),
    ("fld qword [rbp+8]", "dd4508", "x87", {_OPS: 0.25, _RD: 1, _DISP: _slog(8, 32), _MEMB: 0.5, _OPB: 0.5, _LEN: 0.2}),
    ("syscall", "0f05", "system_other", {_RF: 1, _WF: 1, _LEN: 2 / 15}),
    (
        "shl eax,1",
        "d1e0",
        "logic_shift",
        {_OPS: 0.5, _REG: 0.25, "has_immediate": 1, _IMM: _slog(1, 64), _OPB: 3 / 8, _WF: 1, _LEN: 2 / 15},
    ),
]


def _assert_row(row: np.ndarray, cls: str, expected: dict[str, float]) -> None:
    assert row.shape == (28,) and row.dtype == np.float32
    want = np.zeros(28, dtype=np.float32)
    want[ac.CLASS_NAMES.index(cls)] = 1
    for name, value in expected.items():
        want[F[name]] = _f32(value)
    mismatched = {ac.FIELD_NAMES[i]: (float(row[i]), float(want[i])) for i in np.nonzero(row != want)[0]}
    assert not mismatched, f"field (got, want): {mismatched}"


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(
    "description,hex_bytes,cls,expected", KNOWN_INSTRUCTIONS, ids=[case[0] for case in KNOWN_INSTRUCTIONS]
)
def test_known_instruction_vector(decoder, description, hex_bytes, cls, expected):
    rows = ac.encode_bytes(bytes.fromhex(hex_bytes), ip=0x401000, decoder=decoder)
    assert rows.shape == (1, 28), description
    _assert_row(rows[0], cls, expected)


@pytest.mark.parametrize("decoder", DECODERS)
def test_vector_is_position_independent(decoder):
    # RIP-relative and branch fields are relative, so the load address does not matter.
    code = bytes.fromhex("488b0510000000" "e810000000" "7405" "c3")
    low = ac.encode_bytes(code, ip=0x1000, decoder=decoder)
    high = ac.encode_bytes(code, ip=0x7FFF_0000_0000, decoder=decoder)
    assert low.shape == (4, 28)
    assert np.array_equal(low, high)


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoding_stops_at_truncated_or_invalid_instruction(decoder):
    assert ac.encode_bytes(bytes.fromhex("4889d8" "48"), decoder=decoder).shape == (1, 28)  # cut-off REX
    # 06 (push es) is invalid in 64-bit mode.
    assert ac.encode_bytes(bytes.fromhex("c3" "06" "c3"), decoder=decoder).shape == (1, 28)
    assert ac.encode_bytes(b"", decoder=decoder).shape == (0, 28)


@needs_iced
def test_encode_instruction_matches_encode_bytes():
    code = bytes.fromhex("488944cff8")
    instruction = ac.iced_x86.Decoder(64, code, ip=0).decode()
    assert np.array_equal(ac.encode_instruction(instruction), ac.encode_bytes(code, decoder="iced")[0])


def _function_sample(path: str, limit_bytes: int = 60_000) -> list[bytes]:
    image = ac._open_elf(path)
    chunks, total = [], 0
    for start, end in ac.functions_from_eh_frame(path):
        offset = image.offset_of(start, end - start)
        if offset is not None:
            chunks.append(bytes(image.data[offset : offset + end - start]))
            total += end - start
        if total > limit_bytes:
            break
    return chunks


@needs_corpus
@pytest.mark.parametrize("decoder", DECODERS)
def test_real_code_rows_are_well_formed(decoder):
    for code in _function_sample(SMALL_BINARIES[0], 20_000):
        rows = ac.encode_bytes(code, ip=0x1000, decoder=decoder)
        assert np.all(rows[:, :12].sum(axis=1) == 1), "exactly one opcode class per instruction"
        assert np.all(np.abs(rows) <= 1.5), "values stay O(1)"
        assert np.all(rows[:, F[_LEN]] > 0)


@needs_corpus
@needs_iced
@needs_objdump
def test_objdump_fallback_agrees_with_iced_on_real_code():
    rows_iced, rows_objdump = [], []
    for code in _function_sample(SMALL_BINARIES[0]):
        a = ac.encode_bytes(code, decoder="iced")
        b = ac.encode_bytes(code, decoder="objdump")
        assert a.shape == b.shape
        rows_iced.append(a)
        rows_objdump.append(b)
    a, b = np.concatenate(rows_iced), np.concatenate(rows_objdump)
    assert len(a) > 1000
    assert np.mean(np.all(a == b, axis=1)) > 0.99
    assert np.array_equal(a[:, :12], b[:, :12]), "opcode classes must agree"


# --------------------------------------------------------------------------
# ELF / .eh_frame.
# --------------------------------------------------------------------------


@needs_corpus
def test_functions_from_eh_frame_matches_readelf():
    path = SMALL_BINARIES[0]
    ranges = ac.functions_from_eh_frame(path)
    assert len(ranges) > 5
    assert ranges == sorted(set(ranges))
    assert all(start < end for start, end in ranges)
    if not HAVE_READELF:
        return
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
    assert ac.functions_from_eh_frame(stripped) == ac.functions_from_eh_frame(original)


def test_not_elf_is_rejected(tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    assert not ac.is_x86_64_elf(script)
    with pytest.raises(ac.CorpusError):
        ac.functions_from_eh_frame(script)


# --------------------------------------------------------------------------
# Corpus building.
# --------------------------------------------------------------------------


def _records(root: Path) -> dict[str, list[list[list[float]]]]:
    """Parse every data file under root -> {"split/binary": [sequence, ...]}, checking the format."""
    result: dict[str, list] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name == "manifest.json":
            continue
        key = f"{path.parent.parent.name}/{path.parent.name}"
        text = path.read_text(encoding="ascii")
        if path.suffix == ".jsonl":
            lines = text.splitlines()
            assert lines and all(line.strip() for line in lines)
            records = [json.loads(line) for line in lines]
        else:
            assert path.suffix == ".json"
            records = [json.loads(text)]
        for record in records:
            sequence = record["sequence"] if isinstance(record, dict) else record
            if isinstance(record, dict):
                assert set(record) == {"sequence"}
            assert isinstance(sequence, list) and len(sequence) >= 2
            for vector in sequence:
                assert len(vector) == 28
                assert all(type(x) in (int, float) for x in vector)
            result.setdefault(key, []).append(sequence)
    return result


def _digest(sequence) -> str:
    return hashlib.sha256(np.asarray(sequence, dtype=np.float32).tobytes()).hexdigest()


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@needs_corpus
@pytest.mark.parametrize("fmt", ac.FORMATS)
def test_every_format_parses(tmp_path, fmt):
    manifest = ac.build_corpus(tmp_path / "c", max_mb=0.3, seed=1, fmt=fmt, binaries=SMALL_BINARIES[:3], jobs=1)
    records = _records(tmp_path / "c")
    assert records and all(key.startswith("train/") for key in records)
    assert sum(len(v) for v in records.values()) == manifest["totals"]["functions"]
    suffixes = {p.suffix for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert suffixes == {"json": {".json"}, "object": {".json"}, "jsonl": {".jsonl"}, "mixed": suffixes}[fmt]
    stored = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert stored == manifest
    assert stored["field_names"] == list(ac.FIELD_NAMES)
    # Compact numbers: one-hot zeros/ones are written as ints.
    sample = next(p for p in (tmp_path / "c").rglob("*.json*") if p.name != "manifest.json").read_text()
    assert "0.0," not in sample and "1.0," not in sample


@needs_corpus
def test_mixed_format_mixes_record_kinds(tmp_path):
    ac.build_corpus(tmp_path / "c", max_mb=1, seed=0, fmt="mixed", binaries=SMALL_BINARIES, jobs=1)
    kinds = set()
    for path in (tmp_path / "c").rglob("*.json*"):
        if path.name == "manifest.json":
            continue
        for line in path.read_text().splitlines():
            kinds.add((path.suffix, line.startswith("{")))
    assert (".jsonl", True) in kinds and (".jsonl", False) in kinds


@needs_corpus
def test_build_is_deterministic(tmp_path):
    binaries = SMALL_BINARIES[:2]
    first = ac.build_corpus(tmp_path / "a", max_mb=0.2, seed=7, binaries=binaries, jobs=1)
    ac.build_corpus(tmp_path / "b", max_mb=0.2, seed=7, binaries=list(reversed(binaries)), jobs=2)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    assert first["totals"]["functions"] > 10
    # Rebuilding into an existing corpus folder replaces it, same bytes again.
    ac.build_corpus(tmp_path / "a", max_mb=0.2, seed=7, binaries=binaries, jobs=1)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    # Another seed may choose differently, but the result is still well formed.
    other = ac.build_corpus(tmp_path / "c", max_mb=0.2, seed=8, binaries=binaries, jobs=1)
    assert other["seed"] == 8 and _records(tmp_path / "c")


@needs_corpus
def test_functions_are_deduplicated(tmp_path):
    # true and false are built from the same sources: most functions coincide.
    manifest = ac.build_corpus(tmp_path / "c", max_mb=5, seed=0, fmt="jsonl", binaries=SMALL_BINARIES, jobs=1)
    digests = [_digest(s) for seqs in _records(tmp_path / "c").values() for s in seqs]
    assert len(digests) == len(set(digests)) == manifest["totals"]["functions"]
    if {"true", "false"} <= {os.path.basename(b) for b in SMALL_BINARIES}:
        assert manifest["totals"]["duplicates_dropped"] > 0


@needs_corpus
def test_split_assigns_whole_binaries(tmp_path):
    manifest = ac.build_corpus(tmp_path / "c", max_mb=5, seed=3, binaries=SMALL_BINARIES, split=0.5, jobs=2)
    train = {p.name for p in (tmp_path / "c" / "train").iterdir()}
    val = {p.name for p in (tmp_path / "c" / "val").iterdir()}
    assert train and val and not train & val
    assert train == set(manifest["split"]["train"]) and val == set(manifest["split"]["val"])
    assert abs(len(val) - 0.5 * (len(train) + len(val))) <= 1
    records = _records(tmp_path / "c")
    train_digests = {_digest(s) for k, seqs in records.items() if k.startswith("train/") for s in seqs}
    val_digests = {_digest(s) for k, seqs in records.items() if k.startswith("val/") for s in seqs}
    assert train_digests and val_digests and not train_digests & val_digests


@needs_corpus
def test_max_mb_stops_near_budget_from_default_dirs(tmp_path):
    max_mb = 0.4
    manifest = ac.build_corpus(tmp_path / "c", max_mb=max_mb, seed=0, fmt="jsonl")
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name != "manifest.json"]
    written = sum(p.stat().st_size for p in files)
    assert written == manifest["totals"]["bytes"]
    longest = max(len(line) + 1 for p in files for line in p.read_text().splitlines())
    assert max_mb * 1e6 <= written < max_mb * 1e6 + longest
    assert all(ac.is_x86_64_elf(b["path"]) for b in manifest["binaries"])
    quantiles = manifest["length_quantiles"]
    assert 2 <= quantiles["min"] <= quantiles["p50"] <= quantiles["p99"] <= quantiles["max"]


@needs_corpus
@needs_objdump
def test_build_with_objdump_fallback(tmp_path):
    manifest = ac.build_corpus(
        tmp_path / "c", max_mb=0.2, seed=0, binaries=SMALL_BINARIES[:2], decoder="objdump", jobs=1
    )
    assert manifest["decoder"] == "objdump"
    assert _records(tmp_path / "c")


# --------------------------------------------------------------------------
# Errors and CLI.
# --------------------------------------------------------------------------


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
    if SMALL_BINARIES:
        assert ac.main(["--out", str(tmp_path), "--binaries", SMALL_BINARIES[0]]) == 2
        assert "not empty" in _one_line_error(capsys)


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
def test_cli_script_end_to_end(tmp_path):
    out = tmp_path / "c"
    completed = subprocess.run(
        # env and echo: two different programs, together well under the 5 MB budget.
        [sys.executable, str(_TOOL_PATH), "--out", str(out), "--max-mb", "5", "--seed", "5", "--format", "json",
         "--binaries", *SMALL_BINARIES[2:4], "--split", "0.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "p50=" in completed.stdout and "p99=" in completed.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "json" and manifest["seed"] == 5
    assert len(manifest["split"]["train"]) == len(manifest["split"]["val"]) == 1
    assert _records(out)
