"""The 28 instruction fields: names, offsets, and the facts -> 28 floats row encoding.

Both decoders reduce an instruction to the same facts (``row_from_facts``), so
they write the same vector for the same bytes.  Every value is a function of the
instruction bytes alone (addresses are made relative), so identical code
encodes identically wherever it is loaded.

The 28 instruction fields (index: name -- meaning; all values are O(1) and are
rounded to 4 decimals, so small integers are written as ``0``/``1``):

 0-11: class_* -- opcode class one-hot, exactly one is 1:
       0 move (mov*, movzx/sx, cmovcc, xchg, push/pop, leave, string moves,
       cbw..cqo, bswap), 1 arith (add/adc/sub/sbb/inc/dec/neg/mul/div, lea),
       2 logic_shift (and/or/xor/not, shifts/rotates, bit scans, BMI),
       3 compare_test_set (cmp/test/bt/setcc/cmpxchg/cmps/scas),
       4 cond_branch (jcc, loop*, jrcxz), 5 jump (jmp, direct or indirect),
       6 call, 7 return, 8 simd (any xmm/ymm/zmm/mm/k operand, vzeroupper,
       ldmxcsr, ...), 9 x87, 10 system_other (syscall, cpuid, fences, ud2, ...),
       11 nop_padding (nop, endbr64, int3).
   12: operand_count_div4 -- explicit operands / 4.
   13: register_operand_count_div4 -- register operands / 4.
   14: has_immediate -- 1 if an immediate operand is present (branch targets
       are not immediates; they go to field 21).
   15: immediate_slog2_div64 -- sign(x)*log2(1+|x|)/64 of the first immediate,
       read as two's complement at its encoded (sign-extended) width; [-1, 1].
   16: memory_read -- 1 if memory is read (explicit operand or implicit stack:
       pop, ret, leave, string source).
   17: memory_write -- 1 if memory is written (explicit or push/call/stos).
   18: rip_relative -- 1 if the memory operand is RIP-relative.
   19: has_index -- 1 if the memory operand has an index register.
   20: index_scale_log2_div4 -- log2(scale)/4 (scale 1/2/4/8 -> 0/.25/.5/.75).
   21: displacement_slog2_div32 -- sign(d)*log2(1+|d|)/32 of the memory
       displacement (RIP-relative: relative to the next instruction, as
       encoded) or, for relative jumps/calls, of target - next instruction.
   22: memory_bytes_log2p1_div8 -- (1+log2(bytes))/8 of the memory accessed
       (1 B -> .125, 8 B -> .5, 64 B -> .875); 0 when no memory is accessed.
   23: operand_bytes_log2p1_div8 -- same scale for the first operand's width
       (register, memory or immediate size; 8 bytes for branch targets).
   24: vector_register -- 1 if any operand uses an xmm/ymm/zmm/mm/k register.
   25: reads_flags -- 1 if any of OF SF ZF AF CF PF DF IF AC is read.
   26: writes_flags -- 1 if any of those is written, set, cleared or undefined.
   27: length_bytes_div15 -- instruction length in bytes / 15.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = [
    "CLASS_NAMES",
    "FIELD_NAMES",
    "MAX_INSTRUCTION_BYTES",
    "N_FIELDS",
    "C_ARITH",
    "C_CALL",
    "C_COMPARE",
    "C_COND_BRANCH",
    "C_JUMP",
    "C_LOGIC",
    "C_MOVE",
    "C_NOP",
    "C_OTHER",
    "C_RETURN",
    "C_SIMD",
    "C_X87",
    "row_from_facts",
    "row_text",
    "signed",
]

CLASS_NAMES: tuple[str, ...] = (
    "move",
    "arith",
    "logic_shift",
    "compare_test_set",
    "cond_branch",
    "jump",
    "call",
    "return",
    "simd",
    "x87",
    "system_other",
    "nop_padding",
)

FIELD_NAMES: tuple[str, ...] = tuple(f"class_{name}" for name in CLASS_NAMES) + (
    "operand_count_div4",
    "register_operand_count_div4",
    "has_immediate",
    "immediate_slog2_div64",
    "memory_read",
    "memory_write",
    "rip_relative",
    "has_index",
    "index_scale_log2_div4",
    "displacement_slog2_div32",
    "memory_bytes_log2p1_div8",
    "operand_bytes_log2p1_div8",
    "vector_register",
    "reads_flags",
    "writes_flags",
    "length_bytes_div15",
)
N_FIELDS = len(FIELD_NAMES)
assert N_FIELDS == 28

# Class indices: positions in CLASS_NAMES and in the one-hot fields 0-11.
(
    C_MOVE,
    C_ARITH,
    C_LOGIC,
    C_COMPARE,
    C_COND_BRANCH,
    C_JUMP,
    C_CALL,
    C_RETURN,
    C_SIMD,
    C_X87,
    C_OTHER,
    C_NOP,
) = range(12)

# Field offsets after the class one-hot.
_F_OPERANDS = 12
_F_REGISTERS = 13
_F_HAS_IMM = 14
_F_IMM = 15
_F_MEM_READ = 16
_F_MEM_WRITE = 17
_F_RIP = 18
_F_INDEX = 19
_F_SCALE = 20
_F_DISP = 21
_F_MEM_BYTES = 22
_F_OP_BYTES = 23
_F_VECTOR = 24
_F_READS_FLAGS = 25
_F_WRITES_FLAGS = 26
_F_LENGTH = 27

_DECIMALS = 4  # values are rounded so the JSON text is short and re-parses to the same float32
MAX_INSTRUCTION_BYTES = 15


def signed(value: int, bits: int) -> int:
    """Two's-complement reading of ``value`` truncated to ``bits`` bits."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _slog2(value: int, divisor: float) -> float:
    if value == 0:
        return 0.0
    magnitude = math.log2(1.0 + abs(value)) / divisor
    return magnitude if value > 0 else -magnitude


def _log2p1_div8(n_bytes: int) -> float:
    return (1.0 + math.log2(n_bytes)) / 8.0 if n_bytes > 0 else 0.0


def row_from_facts(
    *,
    cls: int,
    n_operands: int,
    n_registers: int,
    immediate: int | None,
    memory_read: bool,
    memory_write: bool,
    rip_relative: bool,
    has_index: bool,
    scale: int,
    displacement: int,
    memory_bytes: int,
    operand_bytes: int,
    vector: bool,
    reads_flags: bool,
    writes_flags: bool,
    length: int,
) -> tuple[float, ...]:
    """The 28 field values of one instruction, rounded to 4 decimals."""
    row = [0.0] * N_FIELDS
    row[cls] = 1.0
    row[_F_OPERANDS] = n_operands / 4.0
    row[_F_REGISTERS] = n_registers / 4.0
    if immediate is not None:
        row[_F_HAS_IMM] = 1.0
        row[_F_IMM] = _slog2(immediate, 64.0)
    row[_F_MEM_READ] = float(memory_read)
    row[_F_MEM_WRITE] = float(memory_write)
    row[_F_RIP] = float(rip_relative)
    row[_F_INDEX] = float(has_index)
    row[_F_SCALE] = math.log2(scale) / 4.0 if has_index and scale > 0 else 0.0
    row[_F_DISP] = _slog2(displacement, 32.0)
    row[_F_MEM_BYTES] = _log2p1_div8(memory_bytes)
    row[_F_OP_BYTES] = _log2p1_div8(operand_bytes)
    row[_F_VECTOR] = float(vector)
    row[_F_READS_FLAGS] = float(reads_flags)
    row[_F_WRITES_FLAGS] = float(writes_flags)
    row[_F_LENGTH] = length / float(MAX_INSTRUCTION_BYTES)
    # "+ 0.0" turns a rounded -0.0 into 0.0 so the text never says "-0".
    return tuple(round(v, _DECIMALS) + 0.0 for v in row)


def _format_number(value: float) -> str:
    # Integral values as ints ("0", "1") keep files compact; the rest use the
    # shortest repr of the 4-decimal value, which re-parses to the same float32.
    return str(int(value)) if value.is_integer() else repr(value)


def row_text(row: Sequence[float]) -> str:
    """The JSON text of one row: ``[1,0,...,0.0667]``."""
    return "[" + ",".join(map(_format_number, row)) + "]"
