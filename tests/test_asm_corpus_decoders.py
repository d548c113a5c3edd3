"""tools/asm_corpus decoders: hand-derived vectors for well-known instructions with both decoders
(iced-x86 and the objdump fallback), and their agreement on real code."""

from __future__ import annotations

import math

import numpy as np
import pytest
from asm_corpus_support import (
    DECODERS,
    SMALL_BINARIES,
    ac,
    iced,
    needs_corpus,
    needs_iced,
    needs_objdump,
)

from tools.asm_corpus import elf

F = {name: i for i, name in enumerate(ac.FIELD_NAMES)}


def _f32(value: float) -> np.float32:
    """The stored value for a field: rounded to 4 decimals, then float32."""
    return np.float32(round(value, 4))


def _slog(value: int, divisor: float) -> float:
    return math.copysign(math.log2(1 + abs(value)) / divisor, value) if value else 0.0


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
    instruction = iced.iced_x86.Decoder(64, code, ip=0).decode()
    assert np.array_equal(ac.encode_instruction(instruction), ac.encode_bytes(code, decoder="iced")[0])


def _function_sample(path: str, limit_bytes: int = 60_000) -> list[bytes]:
    image = elf.open_elf(path)
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
    n_rows = 0
    for code in _function_sample(SMALL_BINARIES[0], 20_000):
        rows = ac.encode_bytes(code, ip=0x1000, decoder=decoder)
        n_rows += len(rows)
        assert np.all(rows[:, :12].sum(axis=1) == 1), "exactly one opcode class per instruction"
        assert np.all(np.abs(rows) <= 1.5), "values stay O(1)"
        assert np.all(rows[:, F[_LEN]] > 0)
    assert n_rows > 1000, "the sample decodes to real instructions"


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
