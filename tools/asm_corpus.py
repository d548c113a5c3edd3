#!/usr/bin/env python3
"""Build a corpus of instruction-vector sequences from this machine's x86-64 binaries.

Each sample is one machine-code function: the list of its instructions, each
encoded as a fixed-width vector of ``len(FIELD_NAMES) == 28`` floats.  Function
boundaries come from the ``.eh_frame`` FDE ranges (system binaries are stripped,
so symbols are useless, but unwind tables are always kept).  Instructions are
decoded with iced-x86 when it is importable, otherwise with ``objdump`` (coarser
memory-access and flag semantics, same 28 fields).

Usage::

    python tools/asm_corpus.py --out DIR [--max-mb N] [--seed S]
        [--format mixed|json|object|jsonl] [--binaries PATH ...] [--split F]
        [--jobs N] [--decoder auto|iced|objdump]
    python tools/asm_corpus.py --check     # exit 0 if a corpus can be built here

User errors (bad path, not an ELF, bad option) print one line and exit 2.

Output layout (mimics the users' ``data/output`` folders)::

    DIR/manifest.json                          binaries, counts, split, field names
    DIR/train/<binary>/part-00000.jsonl        one record per line (array or object)
    DIR/train/<binary>/fn-00000.json           one function per file
    DIR/val/<binary>/...                       only with --split F > 0

Record forms: ``[[28 numbers], ...]`` (format ``json``; ``jsonl`` lines) or
``{"sequence": [[28 numbers], ...]}`` (format ``object``); ``mixed`` is a
deterministic mix of all three (functions shorter than 64 instructions always
go to jsonl parts so the file count stays sane).  ``json`` / ``object`` write
one file per function and therefore take at most 256 functions per binary.
Functions with fewer than 2 instructions are dropped (no next-step target).

Sizing: ``--max-mb`` stops after about that many MB of records (overshoot is
at most one function).  One binary fills at most 1/12 of the budget (>= 1 MiB):
a big library contributes a seeded random sample of its functions, so the
corpus spans many binaries.  Binaries are processed in worker processes (fork)
in a seeded order; results are consumed in that order, so ``--jobs`` does not
change the output.

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

Every value is a function of the instruction bytes alone (addresses are made
relative), so identical code encodes identically wherever it is loaded.

Determinism: for the same seed and the same binaries the output is byte for
byte identical, whatever ``--jobs`` is.  The seed shuffles the binary order,
samples functions inside binaries larger than the per-binary budget, picks the
record forms of ``mixed`` and the train/val assignment.  Identical functions
(same float32 bytes) are kept once across the whole corpus, so no function is
shared between train and val.

Library use::

    from tools import asm_corpus
    if asm_corpus.available():
        manifest = asm_corpus.build_corpus("data/asm", max_mb=30, seed=0)
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import mmap
import multiprocessing
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

try:  # The fast, precise decoder; optional so the objdump fallback can still work.
    import iced_x86
except ImportError:  # pragma: no cover - exercised only where iced-x86 is absent
    iced_x86 = None

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_BINARY_DIRS",
    "FIELD_NAMES",
    "FORMATS",
    "N_FIELDS",
    "CorpusError",
    "available",
    "build_corpus",
    "decoder_available",
    "encode_bytes",
    "encode_instruction",
    "find_binaries",
    "functions_from_eh_frame",
    "is_x86_64_elf",
    "main",
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

FORMATS: tuple[str, ...] = ("mixed", "json", "object", "jsonl")
DEFAULT_BINARY_DIRS: tuple[str, ...] = ("/usr/bin", "/usr/lib/x86_64-linux-gnu")

(
    _C_MOVE,
    _C_ARITH,
    _C_LOGIC,
    _C_COMPARE,
    _C_COND_BRANCH,
    _C_JUMP,
    _C_CALL,
    _C_RETURN,
    _C_SIMD,
    _C_X87,
    _C_OTHER,
    _C_NOP,
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
_MAX_INSTRUCTION_BYTES = 15

# Output sizing.  Parts roll at ~1 MiB; one binary may fill at most 1/12 of the
# corpus (but >= 1 MiB) so a few huge libraries (libLLVM: 100k functions) do not
# crowd out everything else; single-file formats are capped per binary.
_JSONL_PART_BYTES = 1 << 20
_PER_BINARY_SHARE = 12
_MIN_PER_BINARY_BYTES = 1 << 20
_MAX_SINGLE_FILES_PER_BINARY = 256
_MIXED_SINGLE_FILE_MIN_INSTRUCTIONS = 64
_DEFAULT_MAX_MB = 50.0

_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF_PHDR = struct.Struct("<IIQQQQQQ")
_ELF_SHDR = struct.Struct("<IIQQQQIIQQ")
_EM_X86_64 = 62
_ET_EXEC, _ET_DYN = 2, 3
_PT_LOAD = 1
_PT_GNU_EH_FRAME = 0x6474E550
_PF_X = 1
_SHT_NOBITS = 8
_SHF_EXECINSTR = 4

# RFLAGS bits that count for fields 25/26: OF SF ZF AF CF PF DF IF AC (iced's
# RflagsBits layout).  The x87 condition codes C0-C3 and UIF are left out so x87
# compares do not look like integer flag producers.
_FLAG_MASK = 0x1FF


class CorpusError(ValueError):
    """A problem the caller can fix (bad path, not an ELF, bad option value)."""


# --------------------------------------------------------------------------
# Mnemonic tables, shared by the iced and objdump decoders (lower-case names).
# --------------------------------------------------------------------------

_CONDITION_CODES = ("o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g")
# objdump may print aliases for a few condition codes.
_CONDITION_ALIASES = ("c", "nc", "z", "nz", "nae", "nb", "na", "nbe", "pe", "po", "nge", "nl", "ng", "nle")
_ALL_CONDITIONS = _CONDITION_CODES + _CONDITION_ALIASES

_COND_BRANCH_MNEMONICS = frozenset(
    {"j" + cc for cc in _ALL_CONDITIONS} | {"jcxz", "jecxz", "jrcxz", "loop", "loope", "loopne", "loopz", "loopnz"}
)
_SET_MNEMONICS = frozenset("set" + cc for cc in _ALL_CONDITIONS)
_CMOV_MNEMONICS = frozenset("cmov" + cc for cc in _ALL_CONDITIONS)
_RETURN_MNEMONICS = frozenset({"ret", "retf", "retq", "retn", "iret", "iretd", "iretq", "iretw"})
# iced reports syscall as a call and sysret as a return; they are OS gates, not control flow inside a program.
_SYSTEM_GATE_MNEMONICS = frozenset(
    {"syscall", "sysenter", "sysexit", "sysexitq", "sysret", "sysretq", "int", "int1", "into", "ud0", "ud1", "ud2"}
)
_STRING_MOVE_MNEMONICS = frozenset(
    {
        "movs", "movsb", "movsw", "movsq", "stos", "stosb", "stosw", "stosd", "stosq", "lods", "lodsb", "lodsw",
        "lodsd", "lodsq",
    }
)
_STRING_COMPARE_MNEMONICS = frozenset({"cmps", "cmpsb", "cmpsw", "cmpsq", "scas", "scasb", "scasw", "scasd", "scasq"})
# iced names the dword string ops MOVSD / CMPSD, like the SSE2 instructions; the
# SSE2 forms have xmm operands and are classified SIMD before these tables are
# consulted.  objdump spells the string forms "movs" / "cmps", so the fallback's
# string-op semantics below leave movsd / cmpsd out.
_MOVE_MNEMONICS = (
    frozenset(
        {
            "mov", "movabs", "movzx", "movsx", "movsxd", "movbe", "movnti", "xchg", "push", "pop",
            "pushf", "pushfq", "popf", "popfq", "leave", "enter", "cbw", "cwde", "cdqe", "cwd",
            "cdq", "cqo", "bswap", "lahf", "sahf", "xlat", "xlatb", "movsd",
        }
    )
    | _STRING_MOVE_MNEMONICS
    | _CMOV_MNEMONICS
)
_ARITH_MNEMONICS = frozenset(
    {
        "add", "adc", "sub", "sbb", "inc", "dec", "neg", "mul", "imul", "div", "idiv", "xadd", "adcx", "adox",
        "mulx", "lea",
    }
)
_LOGIC_MNEMONICS = frozenset(
    {
        "and", "or", "xor", "not", "shl", "shr", "sar", "sal", "rol", "ror", "rcl", "rcr", "shld", "shrd",
        "bts", "btr", "btc", "bsf", "bsr", "lzcnt", "tzcnt", "popcnt", "andn", "blsi", "blsr", "blsmsk",
        "bzhi", "bextr", "pdep", "pext", "sarx", "shlx", "shrx", "rorx",
    }
)
_COMPARE_MNEMONICS = (
    frozenset({"cmp", "test", "bt", "cmpxchg", "cmpxchg8b", "cmpxchg16b", "cmpsd"})
    | _STRING_COMPARE_MNEMONICS
    | _SET_MNEMONICS
)
_NOP_MNEMONICS = frozenset({"nop", "nopw", "nopl", "endbr64", "endbr32", "int3"})
_X87_NOT_X87 = frozenset({"fxsave", "fxsave64", "fxrstor", "fxrstor64", "femms"})
_SIMD_WITHOUT_REGISTER = frozenset(
    {"vzeroupper", "vzeroall", "ldmxcsr", "stmxcsr", "vldmxcsr", "vstmxcsr", "emms", "femms"}
)

# objdump-only semantic tables (iced computes these exactly).
_FLAG_READERS = (
    frozenset(
        {
            "adc", "sbb", "rcl", "rcr", "pushf", "pushfq", "lahf", "cmc", "into", "adcx", "adox",
            "loope", "loopne", "loopz", "loopnz", "fcmovb", "fcmovbe", "fcmove", "fcmovnb", "fcmovnbe",
            "fcmovne", "fcmovnu", "fcmovu", "syscall",
        }
    )
    | {"j" + cc for cc in _ALL_CONDITIONS}
    | _SET_MNEMONICS
    | _CMOV_MNEMONICS
    | _STRING_MOVE_MNEMONICS  # the direction flag
    | _STRING_COMPARE_MNEMONICS
)
_FLAG_WRITERS = frozenset(
    {
        "add", "adc", "sub", "sbb", "inc", "dec", "neg", "cmp", "test", "and", "or", "xor", "shl", "shr",
        "sar", "sal", "rol", "ror", "rcl", "rcr", "shld", "shrd", "mul", "imul", "div", "idiv", "bt", "bts",
        "btr", "btc", "bsf", "bsr", "lzcnt", "tzcnt", "popcnt", "andn", "blsi", "blsr", "blsmsk", "bzhi",
        "bextr", "xadd", "cmpxchg", "cmpxchg8b", "cmpxchg16b", "popf", "popfq", "sahf", "stc", "clc",
        "cmc", "std", "cld", "sti", "cli", "comiss", "comisd", "ucomiss", "ucomisd", "vcomiss", "vcomisd",
        "vucomiss", "vucomisd", "ptest", "vptest", "vtestps", "vtestpd", "fcomi", "fcomip", "fucomi",
        "fucomip", "adcx", "adox", "rdrand", "rdseed", "syscall", "sysret", "sysretq", "iret", "iretq",
        "pcmpestri", "pcmpestrm", "pcmpistri", "pcmpistrm", "vpcmpestri", "vpcmpestrm", "vpcmpistri",
        "vpcmpistrm", "kortestw", "kortestb", "kortestd", "kortestq", "ktestw", "ktestb", "ktestd",
        "ktestq", "xtest", "xbegin", "xend", "xabort", "verr", "verw", "lar", "lsl",
    }
) | _STRING_COMPARE_MNEMONICS
# Mnemonics whose memory destination is only written (not read-modify-write).
_STORE_ONLY_PREFIXES = (
    "mov", "vmov", "set", "stos", "cvt", "vcvt", "vextract", "extract", "pextr", "vpextr", "vpcompress",
    "vcompress", "vscatter", "vpscatter",
)
_STORE_ONLY_MNEMONICS = frozenset(
    {
        "pop", "fst", "fstp", "fist", "fistp", "fisttp", "fnstcw", "fnstsw", "fnstenv", "fnsave", "fstcw",
        "fstsw", "fstenv", "fsave", "fbstp", "stmxcsr", "vstmxcsr", "fxsave", "fxsave64", "xsave",
        "xsave64", "xsavec", "xsavec64", "xsaveopt", "xsaveopt64", "xsaves", "xsaves64", "sgdt", "sidt",
        "str", "sldt", "smsw", "movdiri", "movdir64b",
    }
)
# Mnemonics whose (first) memory operand is only read.
_LOAD_ONLY_MNEMONICS = frozenset(
    {
        "cmp", "test", "bt", "push", "call", "jmp", "mul", "imul", "div", "idiv", "ucomiss", "ucomisd",
        "comiss", "comisd", "vucomiss", "vucomisd", "vcomiss", "vcomisd", "ptest", "vptest", "clflush",
        "clflushopt", "clwb", "ldmxcsr", "vldmxcsr", "fxrstor", "fxrstor64", "xrstor", "xrstor64",
        "xrstors", "xrstors64", "lgdt", "lidt", "lldt", "ltr", "lmsw", "verr", "verw", "invlpg",
    }
)
_NO_ACCESS_MNEMONICS = frozenset(
    {
        "lea", "nop", "nopw", "nopl", "prefetch", "prefetchw", "prefetcht0", "prefetcht1", "prefetcht2",
        "prefetchnta", "prefetchwt1", "bndcl", "bndcu", "bndcn", "bndmk",
    }
)
_STACK_WRITERS = frozenset({"push", "pushf", "pushfq", "call", "enter"})
_STACK_READERS = frozenset({"pop", "popf", "popfq", "ret", "retf", "retq", "retn", "leave", "iret", "iretd", "iretq"})


def _classify(mnemonic: str, flow_class: int | None, uses_vector_register: bool) -> int:
    """Map a lower-case mnemonic (plus decoder flow info) to a class index.

    ``flow_class`` is the class the decoder derived from control flow (iced's
    FlowControl) or None for a plain instruction / a decoder that lacks it.
    """
    if mnemonic in _SYSTEM_GATE_MNEMONICS:
        return _C_OTHER
    if mnemonic in _NOP_MNEMONICS:
        return _C_NOP
    if flow_class is not None:
        return flow_class
    if mnemonic == "jmp":
        return _C_JUMP
    if mnemonic == "call":
        return _C_CALL
    if mnemonic in _RETURN_MNEMONICS:
        return _C_RETURN
    if mnemonic in _COND_BRANCH_MNEMONICS:
        return _C_COND_BRANCH
    if mnemonic == "wait" or mnemonic == "fwait" or (mnemonic[:1] == "f" and mnemonic not in _X87_NOT_X87):
        return _C_X87
    if uses_vector_register or mnemonic in _SIMD_WITHOUT_REGISTER:
        return _C_SIMD
    if mnemonic in _MOVE_MNEMONICS:
        return _C_MOVE
    if mnemonic in _ARITH_MNEMONICS:
        return _C_ARITH
    if mnemonic in _LOGIC_MNEMONICS:
        return _C_LOGIC
    if mnemonic in _COMPARE_MNEMONICS:
        return _C_COMPARE
    return _C_OTHER


# --------------------------------------------------------------------------
# Facts -> 28 floats.
# --------------------------------------------------------------------------


def _signed(value: int, bits: int) -> int:
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


def _row_from_facts(
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
    row[_F_LENGTH] = length / float(_MAX_INSTRUCTION_BYTES)
    # "+ 0.0" turns a rounded -0.0 into 0.0 so the text never says "-0".
    return tuple(round(v, _DECIMALS) + 0.0 for v in row)


def _format_number(value: float) -> str:
    # Integral values as ints ("0", "1") keep files compact; the rest use the
    # shortest repr of the 4-decimal value, which re-parses to the same float32.
    return str(int(value)) if value.is_integer() else repr(value)


def _row_text(row: Sequence[float]) -> str:
    return "[" + ",".join(map(_format_number, row)) + "]"


class _RowTable:
    """Cache instruction bytes -> row id, with float32 rows and JSON text per id.

    Rows depend only on the instruction bytes, and real code repeats the same
    encodings constantly (push rbp, mov rax,rbx, ...), so each distinct byte
    string is analysed once per process.
    """

    _MAX_ENTRIES = 2_000_000

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.ids: dict[bytes, int] = {}
        self.texts: list[str] = []
        self._rows = np.zeros((4096, N_FIELDS), dtype=np.float32)

    def add(self, key: bytes, row: tuple[float, ...]) -> int:
        row_id = len(self.texts)
        if row_id == self._rows.shape[0]:
            grown = np.zeros((row_id * 2, N_FIELDS), dtype=np.float32)
            grown[:row_id] = self._rows
            self._rows = grown
        self._rows[row_id] = row
        self.texts.append(_row_text(row))
        self.ids[key] = row_id
        return row_id

    def rows(self, row_ids: Sequence[int]) -> np.ndarray:
        return self._rows[np.asarray(row_ids, dtype=np.intp)]

    def maybe_trim(self) -> None:
        # Bounded memory in long runs; ids are only valid within one function,
        # so clearing between functions is safe.
        if len(self.texts) > self._MAX_ENTRIES:
            self.clear()


_TABLES: dict[str, _RowTable] = {}


def _table(decoder: str) -> _RowTable:
    table = _TABLES.get(decoder)
    if table is None:
        table = _TABLES[decoder] = _RowTable()
    return table


# --------------------------------------------------------------------------
# iced-x86 decoder.
# --------------------------------------------------------------------------


class _IcedConstants:
    """iced-x86 enum values and lookup tables, built once on first use."""

    def __init__(self) -> None:
        ix = iced_x86
        self.factory = ix.InstructionInfoFactory()
        self.mnemonic_names = {
            value: name.lower()
            for name, value in vars(ix.Mnemonic).items()
            if name.isupper() and isinstance(value, int)
        }
        ok = ix.OpKind
        self.register_kind = ok.REGISTER
        self.memory_kind = ok.MEMORY
        self.string_memory_kinds = frozenset(
            {
                ok.MEMORY_SEG_SI, ok.MEMORY_SEG_ESI, ok.MEMORY_SEG_RSI, ok.MEMORY_SEG_DI, ok.MEMORY_SEG_EDI,
                ok.MEMORY_SEG_RDI, ok.MEMORY_ESDI, ok.MEMORY_ESEDI, ok.MEMORY_ESRDI,
            }
        )
        self.immediate_bits = {
            ok.IMMEDIATE8: 8, ok.IMMEDIATE8_2ND: 8, ok.IMMEDIATE16: 16, ok.IMMEDIATE32: 32, ok.IMMEDIATE64: 64,
            ok.IMMEDIATE8TO16: 16, ok.IMMEDIATE8TO32: 32, ok.IMMEDIATE8TO64: 64, ok.IMMEDIATE32TO64: 64,
        }
        # Branch operands count as 8 bytes (a target address) whatever their encoding.
        self.branch_kinds = frozenset({ok.NEAR_BRANCH16, ok.NEAR_BRANCH32, ok.NEAR_BRANCH64})
        self.far_branch_kinds = frozenset({ok.FAR_BRANCH16, ok.FAR_BRANCH32})
        fc = ix.FlowControl
        self.flow_classes = {
            fc.CONDITIONAL_BRANCH: _C_COND_BRANCH,
            fc.UNCONDITIONAL_BRANCH: _C_JUMP,
            fc.INDIRECT_BRANCH: _C_JUMP,
            fc.CALL: _C_CALL,
            fc.INDIRECT_CALL: _C_CALL,
            fc.RETURN: _C_RETURN,
            fc.INTERRUPT: _C_OTHER,
            fc.XBEGIN_XABORT_XEND: _C_OTHER,
            fc.EXCEPTION: _C_OTHER,
        }
        oa = ix.OpAccess
        self.reading_accesses = frozenset({oa.READ, oa.COND_READ, oa.READ_WRITE, oa.READ_COND_WRITE})
        self.writing_accesses = frozenset({oa.WRITE, oa.COND_WRITE, oa.READ_WRITE, oa.READ_COND_WRITE})
        self.no_accesses = frozenset({oa.NONE, oa.NO_MEM_ACCESS})
        self.register_none = ix.Register.NONE
        re_ = ix.RegisterExt
        registers = [value for name, value in vars(ix.Register).items() if name.isupper() and isinstance(value, int)]
        self.vector_registers = frozenset(
            r for r in registers if re_.is_vector_register(r) or re_.is_mm(r) or re_.is_k(r)
        )
        self.registers_32 = frozenset(r for r in registers if re_.is_gpr32(r)) | {ix.Register.EIP}
        self.register_size = re_.size
        self.memory_size_bytes = ix.MemorySizeExt.size


_ICED: _IcedConstants | None = None


def _iced() -> _IcedConstants:
    global _ICED
    if iced_x86 is None:
        raise CorpusError("iced-x86 is not installed (pip install iced-x86)")
    if _ICED is None:
        _ICED = _IcedConstants()
    return _ICED


def _iced_row(ins: "iced_x86.Instruction") -> tuple[float, ...]:
    k = _iced()
    mnemonic = k.mnemonic_names.get(ins.mnemonic, "")
    n_operands = ins.op_count
    n_registers = 0
    vector = False
    immediate: int | None = None
    operand_bytes = 0
    explicit_memory_index = -1  # operand index of a MEMORY / string-memory operand
    has_memory_operand = False
    branch_offset = 0
    for i in range(n_operands):
        kind = ins.op_kind(i)
        if kind == k.register_kind:
            register = ins.op_register(i)
            n_registers += 1
            vector = vector or register in k.vector_registers
            if i == 0:
                operand_bytes = k.register_size(register)
        elif kind == k.memory_kind or kind in k.string_memory_kinds:
            has_memory_operand = has_memory_operand or kind == k.memory_kind
            if explicit_memory_index < 0:
                explicit_memory_index = i
            if i == 0:
                operand_bytes = k.memory_size_bytes(ins.memory_size)
        elif kind in k.immediate_bits:
            bits = k.immediate_bits[kind]
            if immediate is None:
                immediate = _signed(ins.immediate(i), bits)
            if i == 0:
                operand_bytes = bits // 8
        elif kind in k.branch_kinds:
            branch_offset = _signed(ins.near_branch_target - ins.next_ip, 64)
            if i == 0:
                operand_bytes = 8
        elif kind in k.far_branch_kinds and i == 0:
            operand_bytes = 8

    rip_relative = False
    has_index = False
    scale = 1
    displacement = branch_offset
    if has_memory_operand:
        rip_relative = ins.is_ip_rel_memory_operand
        index = ins.memory_index
        has_index = index != k.register_none
        scale = ins.memory_index_scale
        vector = vector or index in k.vector_registers  # VSIB gathers/scatters
        base = ins.memory_base
        if rip_relative:
            displacement = _signed(ins.memory_displacement - ins.next_ip, 64)
        elif base in k.registers_32 or index in k.registers_32:
            # addr32 ("lea edx,[ecx-1]"): iced stores the displacement as a u32.
            displacement = _signed(ins.memory_displacement, 32)
        else:
            displacement = _signed(ins.memory_displacement, 64)

    info = k.factory.info(ins)
    memory_read = memory_write = False
    implicit_bytes = 0
    for used in info.used_memory():
        access = used.access
        memory_read = memory_read or access in k.reading_accesses
        memory_write = memory_write or access in k.writing_accesses
        implicit_bytes = max(implicit_bytes, k.memory_size_bytes(used.memory_size))
    memory_bytes = 0
    if explicit_memory_index >= 0 and info.op_access(explicit_memory_index) not in k.no_accesses:
        memory_bytes = k.memory_size_bytes(ins.memory_size)
    if memory_bytes == 0 and (memory_read or memory_write):
        memory_bytes = implicit_bytes

    return _row_from_facts(
        cls=_classify(mnemonic, k.flow_classes.get(ins.flow_control), vector),
        n_operands=n_operands,
        n_registers=n_registers,
        immediate=immediate,
        memory_read=memory_read,
        memory_write=memory_write,
        rip_relative=rip_relative,
        has_index=has_index,
        scale=scale,
        displacement=displacement,
        memory_bytes=memory_bytes,
        operand_bytes=operand_bytes,
        vector=vector,
        reads_flags=bool(ins.rflags_read & _FLAG_MASK),
        writes_flags=bool(ins.rflags_modified & _FLAG_MASK),
        length=ins.len,
    )


def encode_instruction(instruction: "iced_x86.Instruction") -> np.ndarray:
    """Encode one decoded iced-x86 instruction as a (28,) float32 vector."""
    return np.asarray(_iced_row(instruction), dtype=np.float32)


def _iced_function_row_ids(code: bytes, ip: int, table: _RowTable) -> list[int]:
    """Decode ``code`` (one function, loaded at ``ip``) into row ids.

    Decoding stops at the first invalid instruction, including one cut off by
    the end of the range: anything after it cannot be trusted.
    """
    decoder = iced_x86.Decoder(64, code, ip=ip)
    ins = iced_x86.Instruction()
    ids = table.ids
    row_ids: list[int] = []
    offset = 0
    while decoder.can_decode:
        decoder.decode_out(ins)
        if ins.is_invalid:
            break
        length = ins.len
        key = code[offset : offset + length]
        offset += length
        row_id = ids.get(key)
        if row_id is None:
            row_id = table.add(key, _iced_row(ins))
        row_ids.append(row_id)
    return row_ids


# --------------------------------------------------------------------------
# objdump fallback decoder.
# --------------------------------------------------------------------------

_OBJDUMP_LINE = re.compile(r"^\s*([0-9a-f]+):\t([0-9a-f]{2}(?: [0-9a-f]{2})*)\s*\t(.*)$")
_OBJDUMP_PREFIXES = frozenset(
    {
        "lock", "rep", "repz", "repnz", "repe", "repne", "bnd", "notrack", "data16", "data32", "addr32",
        "addr16", "cs", "ds", "es", "fs", "gs", "ss", "xacquire", "xrelease", "{vex}", "{vex3}", "{evex}",
        "{vex2}", "{load}", "{store}", "{disp8}", "{disp32}", "{nooptimize}",
    }
)
_PTR_BYTES = {
    "byte": 1, "word": 2, "dword": 4, "fword": 6, "qword": 8, "tbyte": 10, "oword": 16,
    "xmmword": 16, "ymmword": 32, "zmmword": 64,
}
_NUMBER = re.compile(r"^-?(?:0x[0-9a-f]+|[0-9]+)$")
_VECTOR_REGISTER = re.compile(r"\b(?:[xyz]mm[0-9]+|mm[0-7]|k[0-7])\b")


def _objdump_register_sizes() -> dict[str, int]:
    sizes: dict[str, int] = {}
    for base in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp"):
        sizes["r" + base], sizes["e" + base], sizes[base] = 8, 4, 2
    for low, high in (("al", "ah"), ("bl", "bh"), ("cl", "ch"), ("dl", "dh")):
        sizes[low] = sizes[high] = 1
    for name in ("sil", "dil", "bpl", "spl"):
        sizes[name] = 1
    for n in range(8, 16):
        sizes[f"r{n}"], sizes[f"r{n}d"], sizes[f"r{n}w"], sizes[f"r{n}b"], sizes[f"r{n}l"] = 8, 4, 2, 1, 1
    for n in range(32):
        sizes[f"xmm{n}"], sizes[f"ymm{n}"], sizes[f"zmm{n}"] = 16, 32, 64
    for n in range(8):
        sizes[f"mm{n}"] = 8
        sizes[f"k{n}"] = 8
        sizes[f"st({n})"] = 10
        sizes[f"cr{n}"] = sizes[f"dr{n}"] = sizes[f"db{n}"] = 8
    for n in range(4):
        sizes[f"bnd{n}"] = 16
    sizes["st"] = 10
    sizes["rip"] = 8
    for name in ("es", "cs", "ss", "ds", "fs", "gs"):
        sizes[name] = 2
    return sizes


_REGISTER_BYTES = _objdump_register_sizes()


def _split_operands(text: str) -> list[str]:
    operands: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            operands.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    if tail:
        operands.append(tail)
    # EVEX rounding / sae pseudo-operands ("{rn-sae}") are not operands to iced either.
    return [op for op in operands if op and not (op.startswith("{") and op.endswith("}"))]


@dataclass
class _ObjdumpMemory:
    n_bytes: int = 0
    rip_relative: bool = False
    has_index: bool = False
    scale: int = 1
    displacement: int = 0
    index_is_vector: bool = False


def _parse_memory_operand(operand: str) -> _ObjdumpMemory | None:
    """Parse an Intel-syntax memory operand ("QWORD PTR fs:[rax+rcx*8-0x10]")."""
    text = operand
    n_bytes = 0
    ptr = text.find(" PTR ")
    if ptr >= 0:
        words = text[:ptr].split()
        n_bytes = _PTR_BYTES.get(words[-1].lower(), 0) if words else 0
        text = text[ptr + 5 :].strip()
    bracket = text.find("[")
    if bracket < 0:
        # Absolute form "fs:0x28" / "ds:0x1234" (segment-qualified number).
        seg, colon, number = text.partition(":")
        if colon and seg in _REGISTER_BYTES and _NUMBER.match(number):
            return _ObjdumpMemory(n_bytes=n_bytes, displacement=_signed(int(number, 0), 64))
        return None
    inner = text[bracket + 1 : text.rfind("]")]
    memory = _ObjdumpMemory(n_bytes=n_bytes)
    saw_base = False
    for sign, term in re.findall(r"([+-]?)([^+-]+)", inner):
        term = term.strip()
        if "*" in term:
            register, _, factor = term.partition("*")
            memory.has_index = True
            memory.scale = int(factor)
            memory.index_is_vector = register[:1] in "xyz" and register[1:3] == "mm"
        elif _NUMBER.match(term):
            value = int(term, 0)
            memory.displacement = _signed(-value if sign == "-" else value, 64)
        elif term == "rip" or term == "eip":
            memory.rip_relative = True
        elif term in _REGISTER_BYTES:
            if saw_base:
                memory.has_index = True
            saw_base = True
    return memory


_FP_COMPARE_PREDICATES = {
    name: value
    for value, name in enumerate(
        "eq lt le unord neq nlt nle ord eq_uq nge ngt false neq_oq ge gt true eq_os lt_oq le_oq unord_s "
        "neq_us nlt_uq nle_uq ord_s eq_us nge_uq ngt_uq false_os neq_os ge_oq gt_oq true_us".split()
    )
}
_INT_COMPARE_PREDICATES = {name: value for value, name in enumerate("eq lt le false neq nlt nle true".split())}
_CLMUL_PREDICATES = {"lqlq": 0x00, "hqlq": 0x01, "lqhq": 0x10, "hqhq": 0x11}
_FP_COMPARE_PSEUDO = re.compile(r"^(v?cmp)([a-z_]+)(ps|pd|ss|sd|ph|sh)$")
_INT_COMPARE_PSEUDO = re.compile(r"^vpcmp([a-z]+?)(u?)(b|w|d|q)$")  # vpcmp{pred}[u]{b,w,d,q}
_CLMUL_PSEUDO = re.compile(r"^(v?pclmul)(lqlq|hqlq|lqhq|hqhq)(dq)$")


def _expand_pseudo_op(mnemonic: str) -> tuple[str, int | None]:
    """Undo objdump's predicate pseudo-ops ("cmpltps" = cmpps with imm8 1).

    iced reports the predicate as an immediate operand; objdump folds it into
    the mnemonic and drops the operand.
    """
    if mnemonic.startswith(("cmp", "vcmp")):
        match = _FP_COMPARE_PSEUDO.match(mnemonic)
        if match and match.group(2) in _FP_COMPARE_PREDICATES:
            return match.group(1) + match.group(3), _FP_COMPARE_PREDICATES[match.group(2)]
    if mnemonic.startswith("vpcmp"):
        match = _INT_COMPARE_PSEUDO.match(mnemonic)
        # vpcmpeq{b,w,d,q} without "u" is a real opcode (no immediate), not a pseudo-op.
        if match and match.group(1) in _INT_COMPARE_PREDICATES and (match.group(2) or match.group(1) != "eq"):
            return "vpcmp" + match.group(2) + match.group(3), _INT_COMPARE_PREDICATES[match.group(1)]
    if "pclmul" in mnemonic:
        match = _CLMUL_PSEUDO.match(mnemonic)
        if match:
            return match.group(1) + "qdq", _CLMUL_PREDICATES[match.group(2)]
    return mnemonic, None


def _objdump_row(mnemonic: str, operand_text: str, address: int, length: int) -> tuple[float, ...]:
    operands = _split_operands(operand_text)
    mnemonic, predicate = _expand_pseudo_op(mnemonic)
    if predicate is not None:
        operands.append(hex(predicate))
    # "xchg ax,ax" is objdump's spelling of the two-byte nop (66 90).
    if mnemonic == "xchg" and operands == ["ax", "ax"]:
        mnemonic, operands = "nop", []
    is_branch = mnemonic in ("jmp", "call") or mnemonic in _COND_BRANCH_MNEMONICS or mnemonic == "xbegin"
    next_ip = address + length
    n_registers = 0
    vector = False
    immediate_text: str | None = None
    memory: _ObjdumpMemory | None = None
    memory_position = -1
    operand_bytes = 0
    branch_offset = 0
    first_width = 0  # bytes of the first register / memory operand, for immediate sign
    for position, raw in enumerate(operands):
        operand = re.sub(r"\{[^}]*\}", "", raw).strip()  # EVEX masks "{k1}{z}", broadcasts "{1to16}"
        if operand in _REGISTER_BYTES:
            n_registers += 1
            size = _REGISTER_BYTES[operand]
            vector = vector or _VECTOR_REGISTER.search(operand) is not None
            if position == 0:
                operand_bytes = first_width = size
        elif _NUMBER.match(operand):
            if is_branch:
                branch_offset = _signed(int(operand, 0) - next_ip, 64)
                if position == 0:
                    operand_bytes = 8
            else:
                if immediate_text is None:
                    immediate_text = operand
                if position == 0:
                    operand_bytes = 2 if mnemonic in ("ret", "retf", "enter") else (8 if mnemonic == "push" else 1)
        else:
            parsed = _parse_memory_operand(operand)
            if parsed is None:
                continue
            if memory is None:
                memory, memory_position = parsed, position
            vector = vector or parsed.index_is_vector
            if position == 0:
                operand_bytes = first_width = parsed.n_bytes

    immediate: int | None = None
    if immediate_text is not None:
        value = int(immediate_text, 0)
        # SIMD immediates are always imm8 (iced reads pshufd's 0xe4 as -28); GPR
        # immediates are printed at the destination width, sign-extended.
        bits = 8 if vector else (min(first_width, 8) * 8 if first_width else 64)
        immediate = _signed(value, bits)

    cls = _classify(mnemonic, None, vector)
    memory_read = memory_write = False
    memory_bytes = 0
    if memory is not None and mnemonic not in _NO_ACCESS_MNEMONICS:
        string_op = mnemonic in _STRING_MOVE_MNEMONICS or mnemonic in _STRING_COMPARE_MNEMONICS
        if string_op:
            memory_read = mnemonic not in ("stos", "stosb", "stosw", "stosd", "stosq")
            memory_write = mnemonic in ("movs", "movsb", "movsw", "movsq", "stos", "stosb", "stosw", "stosd", "stosq")
        elif memory_position > 0:
            memory_read = True
            # mov*/cvt* stores never have the memory second; xchg/xadd/cmpxchg do and write it back.
            memory_write = mnemonic in ("xchg", "xadd", "cmpxchg")
        elif mnemonic in _STORE_ONLY_MNEMONICS or mnemonic.startswith(_STORE_ONLY_PREFIXES):
            memory_write = True
        elif mnemonic in _LOAD_ONLY_MNEMONICS or cls == _C_X87 or cls == _C_COND_BRANCH:
            memory_read = True
        else:
            memory_read = memory_write = True
        memory_bytes = memory.n_bytes
    stack_write = mnemonic in _STACK_WRITERS
    stack_read = mnemonic in _STACK_READERS
    memory_write = memory_write or stack_write
    memory_read = memory_read or stack_read
    if memory_bytes == 0 and (stack_write or stack_read):
        memory_bytes = 8

    return _row_from_facts(
        cls=cls,
        n_operands=len(operands),
        n_registers=n_registers,
        immediate=immediate,
        memory_read=memory_read,
        memory_write=memory_write,
        rip_relative=memory.rip_relative if memory else False,
        has_index=memory.has_index if memory else False,
        scale=memory.scale if memory else 1,
        displacement=memory.displacement if memory else branch_offset,
        memory_bytes=memory_bytes,
        operand_bytes=operand_bytes,
        vector=vector,
        reads_flags=mnemonic in _FLAG_READERS,
        writes_flags=mnemonic in _FLAG_WRITERS,
        length=length,
    )


def _split_objdump_text(text: str) -> tuple[str, str] | None:
    """'rep stos QWORD PTR es:[rdi],rax  # c' -> ('stos', 'QWORD PTR es:[rdi],rax'); None if invalid."""
    text = text.split("#", 1)[0]
    text = re.sub(r"\s*<[^>]*>", "", text).strip()
    while True:
        head, _, rest = text.partition(" ")
        if head in _OBJDUMP_PREFIXES or head.startswith("rex"):
            text = rest.strip()
            if not text:  # a lone prefix byte: decoders treat it as garbage
                return None
            continue
        break
    if not head or head.startswith("(bad)") or head == ".byte":
        return None
    return head.lower(), rest.strip()


def _objdump_path() -> str | None:
    return shutil.which("objdump")


def _objdump_decode(blob: bytes, base_ip: int) -> Iterator[tuple[int, int, str, str]]:
    """Linear-sweep ``blob`` with objdump; yield (offset, length, mnemonic, operands).

    An undecodable instruction yields mnemonic "" so callers can stop there.
    """
    objdump = _objdump_path()
    if objdump is None:
        raise CorpusError("objdump is not installed (binutils)")
    if not blob:  # objdump refuses empty input files
        return
    with tempfile.NamedTemporaryFile(prefix="asm_corpus_", suffix=".bin") as handle:
        handle.write(blob)
        handle.flush()
        # -z: do not collapse runs of zero bytes into "..."; -w: all bytes on one line.
        command = [
            objdump, "-D", "-z", "-w", "-b", "binary", "-m", "i386:x86-64", "-M", "intel",
            f"--adjust-vma={base_ip:#x}", handle.name,
        ]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[0]
        raise CorpusError(f"objdump failed (exit {result.returncode}): {detail}")
    for line in result.stdout.splitlines():
        match = _OBJDUMP_LINE.match(line)
        if match is None:
            continue
        address = int(match.group(1), 16)
        length = (len(match.group(2)) + 1) // 3
        parts = _split_objdump_text(match.group(3))
        if parts is None:
            yield address - base_ip, length, "", ""
        else:
            yield address - base_ip, length, parts[0], parts[1]


def _objdump_row_ids(
    blob: bytes, base_ip: int, bounds: Sequence[tuple[int, int]], table: _RowTable
) -> list[list[int]]:
    """Decode ``blob`` once and cut it into functions at ``bounds`` (blob offsets).

    A function ends at its first undecodable instruction or at an instruction
    that would cross its end, the same rule as the iced path.
    """
    results: list[list[int]] = [[] for _ in bounds]
    closed = [False] * len(bounds)
    starts = {start: i for i, (start, _) in enumerate(bounds)}
    current = -1
    expected = -1  # offset where the current function's next instruction must start
    ids = table.ids
    for offset, length, mnemonic, operands in _objdump_decode(blob, base_ip):
        if offset in starts:
            current = starts[offset]
            expected = offset
        if current < 0 or closed[current]:
            continue
        start, end = bounds[current]
        if offset != expected or offset + length > end or not mnemonic:
            closed[current] = True
            continue
        expected = offset + length
        key = blob[offset : offset + length]
        row_id = ids.get(key)
        if row_id is None:
            row_id = table.add(key, _objdump_row(mnemonic, operands, base_ip + offset, length))
        results[current].append(row_id)
        if expected == end:
            closed[current] = True
    return results


# --------------------------------------------------------------------------
# Public encoding entry point.
# --------------------------------------------------------------------------


def _resolve_decoder(decoder: str) -> str:
    if decoder == "auto":
        if iced_x86 is not None:
            return "iced"
        if _objdump_path() is not None:
            return "objdump"
        raise CorpusError("no x86 decoder: install iced-x86 (pip install iced-x86) or binutils (objdump)")
    if decoder == "iced":
        _iced()
        return decoder
    if decoder == "objdump":
        if _objdump_path() is None:
            raise CorpusError("objdump is not installed (binutils)")
        return decoder
    raise CorpusError(f"unknown decoder {decoder!r} (choose auto, iced or objdump)")


def encode_bytes(code: bytes, ip: int = 0, decoder: str = "auto") -> np.ndarray:
    """Decode x86-64 machine code loaded at ``ip``; return (N, 28) float32.

    Decoding is a linear sweep that stops at the first invalid or truncated
    instruction.  ``decoder`` is "auto" (iced-x86 if importable, else objdump),
    "iced" or "objdump".
    """
    code = bytes(code)
    name = _resolve_decoder(decoder)
    table = _table(name)
    table.maybe_trim()
    if name == "iced":
        row_ids = _iced_function_row_ids(code, ip, table)
    else:
        row_ids = _objdump_row_ids(code, ip, [(0, len(code))], table)[0]
    if not row_ids:
        return np.zeros((0, N_FIELDS), dtype=np.float32)
    return table.rows(row_ids)


# --------------------------------------------------------------------------
# ELF and .eh_frame parsing.
# --------------------------------------------------------------------------


def is_x86_64_elf(path: str | os.PathLike) -> bool:
    """True for a readable 64-bit little-endian x86-64 executable or shared object."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(20)
    except OSError:
        return False
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return False
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    return e_machine == _EM_X86_64 and e_type in (_ET_EXEC, _ET_DYN)


@dataclass
class _ElfImage:
    data: bytes | mmap.mmap
    loads: list[tuple[int, int, int, int]]  # (vaddr, file offset, file size, flags)
    code_ranges: list[tuple[int, int]]  # executable [start, end) virtual ranges backed by file bytes
    eh_frame: tuple[int, int] | None  # (vaddr, size)

    def offset_of(self, vaddr: int, size: int = 1) -> int | None:
        for seg_vaddr, seg_offset, seg_size, _ in self.loads:
            if seg_vaddr <= vaddr and vaddr + size <= seg_vaddr + seg_size:
                return seg_offset + (vaddr - seg_vaddr)
        return None

    def close(self) -> None:
        if isinstance(self.data, mmap.mmap):
            self.data.close()

    def load_end(self, vaddr: int) -> int:
        for seg_vaddr, _, seg_size, _ in self.loads:
            if seg_vaddr <= vaddr < seg_vaddr + seg_size:
                return seg_vaddr + seg_size
        return vaddr


def _open_elf(path: str | os.PathLike) -> _ElfImage:
    """Map an x86-64 ELF file and index its segments, code sections and .eh_frame."""
    with open(path, "rb") as handle:
        try:
            data: bytes | mmap.mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty or unmappable file
            data = handle.read()
    try:
        return _parse_elf(data)
    except (ValueError, IndexError, struct.error):
        if isinstance(data, mmap.mmap):
            data.close()
        raise


def _parse_elf(data: bytes | mmap.mmap) -> _ElfImage:
    if len(data) < _ELF_HEADER.size:
        raise ValueError("truncated ELF header")
    (ident, e_type, e_machine, _, _, e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx) = (
        _ELF_HEADER.unpack_from(data, 0)
    )
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1 or e_machine != _EM_X86_64:
        raise ValueError("not an x86-64 ELF file")
    if e_type not in (_ET_EXEC, _ET_DYN):
        raise ValueError("not an executable or shared object")

    loads: list[tuple[int, int, int, int]] = []
    eh_frame_hdr: tuple[int, int, int] | None = None  # (vaddr, offset, size)
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, _, p_filesz, _, _ = _ELF_PHDR.unpack_from(data, e_phoff + i * e_phentsize)
        if p_type == _PT_LOAD and p_filesz:
            loads.append((p_vaddr, p_offset, p_filesz, p_flags))
        elif p_type == _PT_GNU_EH_FRAME:
            eh_frame_hdr = (p_vaddr, p_offset, p_filesz)

    sections: list[tuple[str, int, int, int, int, int]] = []  # (name, type, flags, addr, offset, size)
    if e_shoff and e_shentsize:
        if e_shnum == 0:  # extended numbering: the real count lives in section 0
            e_shnum = _ELF_SHDR.unpack_from(data, e_shoff)[5]
        raw = [_ELF_SHDR.unpack_from(data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
        if e_shstrndx == 0xFFFF:
            e_shstrndx = raw[0][6]
        names_offset = raw[e_shstrndx][4] if e_shstrndx < len(raw) else 0
        for sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, *_ in raw:
            end = data.find(b"\0", names_offset + sh_name)
            name = bytes(data[names_offset + sh_name : end]).decode("latin-1") if names_offset else ""
            sections.append((name, sh_type, sh_flags, sh_addr, sh_offset, sh_size))

    code_ranges = [
        (addr, addr + size)
        for _, sh_type, flags, addr, _, size in sections
        if flags & _SHF_EXECINSTR and sh_type != _SHT_NOBITS and size and addr
    ]
    if not code_ranges:  # no section headers (sstripped): fall back to executable segments
        code_ranges = [(vaddr, vaddr + size) for vaddr, _, size, flags in loads if flags & _PF_X]
    code_ranges.sort()

    image = _ElfImage(data=data, loads=loads, code_ranges=code_ranges, eh_frame=None)
    for name, sh_type, _, addr, _, size in sections:
        if name == ".eh_frame" and sh_type != _SHT_NOBITS and size:
            image.eh_frame = (addr, size)
            break
    if image.eh_frame is None and eh_frame_hdr is not None:
        hdr_vaddr, hdr_offset, hdr_size = eh_frame_hdr
        if hdr_size >= 8 and data[hdr_offset] == 1:
            pointer, _ = _read_encoded(data, hdr_offset + 4, data[hdr_offset + 1], hdr_vaddr + 4, hdr_vaddr)
            if pointer is not None and image.offset_of(pointer) is not None:
                image.eh_frame = (pointer, image.load_end(pointer) - pointer)
    return image


def _read_uleb(data: bytes | mmap.mmap, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _read_sleb(data: bytes | mmap.mmap, pos: int) -> tuple[int, int]:
    result, end = _read_uleb(data, pos)
    if data[end - 1] & 0x40:  # sign bit of the last 7-bit group
        result -= 1 << (7 * (end - pos))
    return result, end


_FIXED_ENCODINGS = {
    0x00: ("<Q", 8),  # absptr (64-bit target)
    0x02: ("<H", 2),
    0x03: ("<I", 4),
    0x04: ("<Q", 8),
    0x0A: ("<h", 2),
    0x0B: ("<i", 4),
    0x0C: ("<q", 8),
}


def _read_encoded(
    data: bytes | mmap.mmap, pos: int, encoding: int, field_vaddr: int, datarel_base: int = 0
) -> tuple[int | None, int]:
    """Read a DW_EH_PE-encoded pointer; returns (value or None if unsupported, new pos)."""
    if encoding == 0xFF:  # DW_EH_PE_omit
        return None, pos
    fmt = encoding & 0x0F
    if fmt == 0x01:
        value, new_pos = _read_uleb(data, pos)
    elif fmt == 0x09:
        value, new_pos = _read_sleb(data, pos)
    elif fmt in _FIXED_ENCODINGS:
        code, size = _FIXED_ENCODINGS[fmt]
        value, new_pos = struct.unpack_from(code, data, pos)[0], pos + size
    else:
        raise ValueError(f"unsupported pointer encoding {encoding:#x}")
    application = encoding & 0x70
    if application == 0x10:  # pcrel
        value += field_vaddr
    elif application == 0x30:  # datarel
        value += datarel_base
    elif application != 0:  # textrel / funcrel / aligned: never used for x86-64 FDEs
        return None, new_pos
    return value & 0xFFFFFFFFFFFFFFFF, new_pos


def _pointer_size(data: bytes | mmap.mmap, pos: int, encoding: int) -> int:
    fmt = encoding & 0x0F
    if fmt in (0x01, 0x09):
        return _read_uleb(data, pos)[1] - pos
    return _FIXED_ENCODINGS[fmt][1]


def _parse_cie(data: bytes | mmap.mmap, pos: int) -> int:
    """Return the FDE pointer encoding of the CIE whose length field is at ``pos``."""
    length = struct.unpack_from("<I", data, pos)[0]
    body = pos + 4
    if length == 0xFFFFFFFF:
        body = pos + 12
    cie_id = struct.unpack_from("<I", data, body)[0]
    if cie_id != 0:
        raise ValueError("FDE points at a non-CIE entry")
    version = data[body + 4]
    end = data.find(b"\0", body + 5)
    augmentation = bytes(data[body + 5 : end]).decode("latin-1")
    p = end + 1
    if "eh" in augmentation:  # ancient GCC: eh_ptr
        p += 8
    _, p = _read_uleb(data, p)  # code alignment
    _, p = _read_sleb(data, p)  # data alignment
    if version == 1:
        p += 1
    else:
        _, p = _read_uleb(data, p)  # return address register
    encoding = 0x00  # absptr when the CIE has no 'R' augmentation
    if augmentation.startswith("z"):
        _, p = _read_uleb(data, p)
        for letter in augmentation[1:]:
            if letter == "R":
                encoding = data[p]
                p += 1
            elif letter == "P":
                personality_encoding = data[p]
                p += 1 + _pointer_size(data, p + 1, personality_encoding)
            elif letter == "L":
                p += 1
            elif letter in "SBG":
                continue
            else:
                break  # unknown augmentation: the rest cannot be parsed, but 'R' usually came first
    return encoding


def _fde_ranges(image: _ElfImage) -> list[tuple[int, int]]:
    if image.eh_frame is None:
        return []
    vaddr, size = image.eh_frame
    start = image.offset_of(vaddr)
    if start is None:
        return []
    data = image.data
    end = min(start + size, len(data))
    cie_encodings: dict[int, int] = {}
    ranges: list[tuple[int, int]] = []
    pos = start
    while pos + 4 <= end:
        length = struct.unpack_from("<I", data, pos)[0]
        if length == 0:  # terminator
            break
        header = 4
        if length == 0xFFFFFFFF:
            length = struct.unpack_from("<Q", data, pos + 4)[0]
            header = 12
        body = pos + header
        next_pos = body + length
        if next_pos > end:
            break
        cie_pointer = struct.unpack_from("<I", data, body)[0]
        if cie_pointer != 0:  # an FDE; a CIE has id 0 in .eh_frame
            cie_pos = body - cie_pointer
            encoding = cie_encodings.get(cie_pos)
            if encoding is None:
                encoding = cie_encodings[cie_pos] = _parse_cie(data, cie_pos)
            field_pos = body + 4
            begin, p = _read_encoded(data, field_pos, encoding, vaddr + (field_pos - start))
            span, _ = _read_encoded(data, p, encoding & 0x0F, 0)
            if begin is not None and span:
                ranges.append((begin, begin + span))
        pos = next_pos
    return ranges


def _function_ranges(image: _ElfImage) -> list[tuple[int, int]]:
    """FDE ranges inside executable code, clipped to their section, sorted, unique."""
    code = image.code_ranges
    result = set()
    for begin, end in _fde_ranges(image):
        for code_start, code_end in code:
            if code_start <= begin < code_end:
                end = min(end, code_end)
                if end > begin:
                    result.add((begin, end))
                break
    return sorted(result)


def functions_from_eh_frame(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Virtual-address ranges [start, end) of the functions described by ``.eh_frame``.

    Raises CorpusError if ``path`` is not an x86-64 ELF executable/shared object.
    """
    if not is_x86_64_elf(path):
        raise CorpusError(f"{path}: not an x86-64 ELF executable or shared library")
    try:
        image = _open_elf(path)
        try:
            return _function_ranges(image)
        finally:
            image.close()
    except (ValueError, IndexError, struct.error) as error:
        raise CorpusError(f"{path}: malformed ELF or .eh_frame ({error})") from None


# --------------------------------------------------------------------------
# Per-binary work (runs in worker processes).
# --------------------------------------------------------------------------


@dataclass
class _BinaryTask:
    path: str
    name: str
    seed: int
    max_bytes: int
    max_functions: int | None
    decoder: str


@dataclass
class _BinaryResult:
    path: str
    name: str
    n_fdes: int = 0
    n_short: int = 0  # functions dropped for having < 2 instructions
    # (start vaddr, n_instructions, float32 digest, array text), sorted by start
    functions: list[tuple[int, int, bytes, str]] = field(default_factory=list)
    error: str | None = None


def _digest(rows: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(rows, dtype=np.float32).tobytes(), digest_size=16).digest()


def _encode_binary(task: _BinaryTask) -> _BinaryResult:
    """Decode and encode the functions of one binary within its byte budget."""
    result = _BinaryResult(path=task.path, name=task.name)
    try:
        image = _open_elf(task.path)
    except (OSError, ValueError, IndexError, struct.error) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    try:
        ranges = _function_ranges(image)
    except (ValueError, IndexError, struct.error) as error:
        # System binaries are not all well formed; one bad .eh_frame must not stop the corpus.
        image.close()
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.n_fdes = len(ranges)
    # Visit functions in a seeded order and stop at the budget, so a big library
    # contributes a random sample rather than its first N functions.
    order = list(range(len(ranges)))
    random.Random(f"asm-corpus/{task.seed}/{task.name}/functions").shuffle(order)
    table = _table(task.decoder)
    table.maybe_trim()
    kept: list[tuple[int, int, bytes, str]] = []
    seen: set[bytes] = set()
    budget = task.max_bytes
    texts = table.texts

    def accept(start: int, row_ids: list[int]) -> bool:
        """Record one function; False once the budget is spent."""
        nonlocal budget
        if len(row_ids) < 2:
            result.n_short += 1
            return True
        digest = _digest(table.rows(row_ids))
        if digest in seen:
            return True
        seen.add(digest)
        text = "[" + ",".join([texts[i] for i in row_ids]) + "]"
        kept.append((start, len(row_ids), digest, text))
        budget -= len(text) + 1
        return budget > 0 and (task.max_functions is None or len(kept) < task.max_functions)

    data = image.data
    if task.decoder == "iced":
        for index in order:
            start, end = ranges[index]
            offset = image.offset_of(start, end - start)
            if offset is None:
                continue
            if not accept(start, _iced_function_row_ids(bytes(data[offset : offset + end - start]), start, table)):
                break
    else:
        # objdump costs a process per call, so decode batches of functions laid
        # end to end in one blob.  15 bytes of nop (0x90) after each function make
        # a decode that runs past a function's end resynchronise before the next.
        # Batches start small (a budget is often met after a few dozen functions)
        # and grow for binaries that need more.
        batch_code_bytes = 64 << 10
        pad = b"\x90" * _MAX_INSTRUCTION_BYTES
        position = 0
        done = False
        while position < len(order) and not done:
            blob = bytearray()
            bounds: list[tuple[int, int]] = []
            starts: list[int] = []
            while position < len(order) and len(blob) < batch_code_bytes:
                start, end = ranges[order[position]]
                position += 1
                offset = image.offset_of(start, end - start)
                if offset is None:
                    continue
                bounds.append((len(blob), len(blob) + end - start))
                starts.append(start)
                blob += data[offset : offset + end - start]
                blob += pad
            if not bounds:
                break
            batch_code_bytes = min(batch_code_bytes * 2, 1 << 20)
            for start, row_ids in zip(starts, _objdump_row_ids(bytes(blob), 0, bounds, table), strict=True):
                if not accept(start, row_ids):
                    done = True
                    break
    image.close()
    kept.sort()
    result.functions = kept
    return result


# --------------------------------------------------------------------------
# Binary discovery.
# --------------------------------------------------------------------------


def find_binaries(dirs: Iterable[str | os.PathLike] = DEFAULT_BINARY_DIRS) -> list[str]:
    """Real paths of the x86-64 ELF executables / shared objects directly in ``dirs``, sorted.

    Symlinks are resolved and duplicates dropped; anything else (scripts, static
    archives, other architectures) is skipped quietly.
    """
    found: set[str] = set()
    for directory in dirs:
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries:
            path = os.path.realpath(os.path.join(directory, entry))
            if path not in found and os.path.isfile(path) and is_x86_64_elf(path):
                found.add(path)
    return sorted(found)


def _candidate_paths(dirs: Iterable[str | os.PathLike]) -> list[str]:
    """Unique real paths of regular files directly in ``dirs`` (no ELF check yet)."""
    found: set[str] = set()
    for directory in dirs:
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            path = os.path.realpath(os.path.join(directory, entry))
            if os.path.isfile(path):
                found.add(path)
    return sorted(found)


def decoder_available() -> bool:
    """Whether iced-x86 is importable or objdump is on PATH."""
    return iced_x86 is not None or _objdump_path() is not None


_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether this machine has x86-64 ELF binaries in the default dirs and a decoder."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = decoder_available() and _any_default_binary()
    return _AVAILABLE


def _any_default_binary() -> bool:
    for directory in DEFAULT_BINARY_DIRS:
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries[:200]:  # an x86-64 system has ELF files early in /usr/bin
            path = os.path.join(directory, entry)
            if os.path.isfile(path) and is_x86_64_elf(path):
                return True
    return False


def _resolve_binaries(paths: Sequence[str | os.PathLike] | None) -> list[str]:
    """Candidate files in a fixed order: explicit files must be ELF x86-64, dirs are scanned."""
    if paths is None:
        return _candidate_paths(DEFAULT_BINARY_DIRS)
    result: list[str] = []
    seen: set[str] = set()
    for raw in paths:
        path = os.fspath(raw)
        if os.path.isdir(path):
            for candidate in _candidate_paths([path]):
                if candidate not in seen:
                    seen.add(candidate)
                    result.append(candidate)
        elif os.path.isfile(path):
            if not is_x86_64_elf(path):
                raise CorpusError(f"{path}: not an x86-64 ELF executable or shared library")
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                result.append(real)
        else:
            raise CorpusError(f"{path}: no such file or directory")
    return sorted(result)


_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def _folder_name(path: str, used: set[str]) -> str:
    base = _NAME_UNSAFE.sub("_", os.path.basename(path)) or "binary"
    if base.startswith("."):
        base = "_" + base
    name, n = base, 2
    while name in used:
        name = f"{base}-{n}"
        n += 1
    used.add(name)
    return name


# --------------------------------------------------------------------------
# Corpus writing.
# --------------------------------------------------------------------------


class _BinaryWriter:
    """Writes one binary's records into DIR/<split>/<name>/ in the chosen format."""

    def __init__(self, folder: Path, fmt: str, rng: random.Random) -> None:
        self.folder = folder
        self.fmt = fmt
        self.rng = rng
        self.files = 0
        self.single_files = 0
        self.bytes_written = 0
        self._part: list[str] = []
        self._part_bytes = 0
        self._parts = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _write_file(self, name: str, text: str) -> None:
        with open(self.folder / name, "w", encoding="ascii", newline="\n") as handle:
            handle.write(text)
        self.files += 1
        self.bytes_written += len(text)

    def _write_single(self, text: str) -> None:
        self._write_file(f"fn-{self.single_files:05d}.json", text)
        self.single_files += 1

    def add(self, array_text: str, n_instructions: int) -> None:
        as_object = '{"sequence":' + array_text + "}"
        if self.fmt == "json":
            self._write_single(array_text + "\n")
        elif self.fmt == "object":
            self._write_single(as_object + "\n")
        elif self.fmt == "jsonl":
            self._add_line(array_text)
        else:
            # mixed: long functions sometimes get a file of their own, short ones
            # always share jsonl parts.  Draws happen in a fixed order, so the
            # layout is deterministic for the seed.
            draw = self.rng.random()
            single_ok = (
                n_instructions >= _MIXED_SINGLE_FILE_MIN_INSTRUCTIONS
                and self.single_files < _MAX_SINGLE_FILES_PER_BINARY
            )
            if single_ok and draw < 1 / 3:
                self._write_single(array_text + "\n")
            elif single_ok and draw < 2 / 3:
                self._write_single(as_object + "\n")
            else:
                self._add_line(array_text if self.rng.random() < 0.5 else as_object)

    def _add_line(self, record: str) -> None:
        self._part.append(record)
        self._part.append("\n")
        self._part_bytes += len(record) + 1
        if self._part_bytes >= _JSONL_PART_BYTES:
            self._flush_part()

    def _flush_part(self) -> None:
        if self._part:
            self._write_file(f"part-{self._parts:05d}.jsonl", "".join(self._part))
            self._parts += 1
            self._part = []
            self._part_bytes = 0

    def close(self) -> None:
        self._flush_part()

    @property
    def pending_bytes(self) -> int:
        return self.bytes_written + self._part_bytes


def _val_target(n_binaries: int, fraction: float) -> int:
    """How many of the first ``n_binaries`` go to val: round(n*F), but with >= 2
    binaries at least one on each side so neither folder is empty."""
    if fraction <= 0 or n_binaries < 2:
        return 0
    target = int(math.floor(n_binaries * fraction + 0.5))
    return min(max(target, 1), n_binaries - 1)


def _quantiles(lengths: Sequence[int]) -> dict[str, float]:
    if not lengths:
        return {}
    values = np.sort(np.asarray(lengths, dtype=np.int64))
    result: dict[str, float] = {"min": int(values[0])}
    for q in (0.5, 0.9, 0.99):
        result[f"p{int(q * 100)}"] = int(values[min(len(values) - 1, int(q * len(values)))])
    result["max"] = int(values[-1])
    result["mean"] = round(float(values.mean()), 2)
    return result


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CorpusError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        # Only a previous corpus (it has our manifest) may be replaced; anything
        # else in the folder is the user's and is left alone.
        if not (out / "manifest.json").is_file():
            raise CorpusError(f"{out}: directory is not empty and holds no corpus manifest.json")
        for child in ("train", "val"):
            if (out / child).is_dir():
                shutil.rmtree(out / child)
        (out / "manifest.json").unlink()
    out.mkdir(parents=True, exist_ok=True)


def _default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _iter_results(tasks: Iterator[_BinaryTask], jobs: int) -> Iterator[_BinaryResult]:
    """Results in task order; workers run a bounded window ahead of the consumer."""
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        # fork keeps this working when the module was loaded from a file path
        # (tests, scripts); without it, stay in-process.
        for task in tasks:
            yield _encode_binary(task)
        return
    pool = multiprocessing.get_context("fork").Pool(jobs)
    try:
        pending: collections.deque = collections.deque()
        window = 2 * jobs
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                else:
                    pending.append(pool.apply_async(_encode_binary, (task,)))
            if not pending:
                return
            yield pending.popleft().get()
    finally:
        # The consumer stops early once the corpus is full; drop in-flight work.
        pool.terminate()
        pool.join()


def build_corpus(
    out: str | os.PathLike,
    max_mb: float = _DEFAULT_MAX_MB,
    seed: int = 0,
    fmt: str = "mixed",
    binaries: Sequence[str | os.PathLike] | None = None,
    split: float = 0.0,
    *,
    jobs: int | None = None,
    decoder: str = "auto",
    verbose: bool = False,
) -> dict:
    """Write the corpus to ``out`` and return its manifest (also in out/manifest.json).

    ``binaries``: files and/or folders to draw from (default: /usr/bin and
    /usr/lib/x86_64-linux-gnu).  ``split``: fraction of binaries that go to
    ``out/val``.  Stops after about ``max_mb`` MB of records.  Raises
    CorpusError for bad arguments.
    """
    if fmt not in FORMATS:
        raise CorpusError(f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")
    if not (isinstance(max_mb, (int, float)) and math.isfinite(max_mb) and max_mb > 0):
        raise CorpusError(f"--max-mb must be a positive number, got {max_mb!r}")
    if not (isinstance(split, (int, float)) and 0.0 <= split < 1.0):
        raise CorpusError(f"--split must be in [0, 1), got {split!r}")
    if jobs is not None and jobs < 1:
        raise CorpusError(f"--jobs must be >= 1, got {jobs!r}")
    decoder_name = _resolve_decoder(decoder)
    candidates = _resolve_binaries(binaries)
    random.Random(f"asm-corpus/{seed}/binaries").shuffle(candidates)
    out_path = Path(out)
    _prepare_out_dir(out_path)

    started = time.perf_counter()
    max_bytes = int(max_mb * 1_000_000)
    per_binary_bytes = max(_MIN_PER_BINARY_BYTES, max_bytes // _PER_BINARY_SHARE)
    max_functions = _MAX_SINGLE_FILES_PER_BINARY if fmt in ("json", "object") else None
    used_names: set[str] = set()

    def tasks() -> Iterator[_BinaryTask]:
        for path in candidates:
            if is_x86_64_elf(path):  # default dirs hold scripts and archives too
                name = _folder_name(path, used_names)
                yield _BinaryTask(path, name, seed, per_binary_bytes, max_functions, decoder_name)

    seen: set[bytes] = set()
    total_bytes = 0
    duplicates = 0
    lengths: list[int] = []
    used: list[dict] = []
    empty: list[str] = []
    errors: dict[str, str] = {}
    val_count = 0
    results = _iter_results(tasks(), jobs or _default_jobs())
    try:
        for result in results:
            if result.error:
                errors[result.name] = result.error
            fresh = []
            binary_duplicates = 0
            for _start, n_instructions, digest, text in result.functions:
                if digest in seen:
                    binary_duplicates += 1
                else:
                    seen.add(digest)
                    fresh.append((n_instructions, text))
            duplicates += binary_duplicates
            if not fresh:
                empty.append(result.name)
                continue
            to_val = val_count < _val_target(len(used) + 1, split)
            val_count += to_val
            split_name = "val" if to_val else "train"
            writer = _BinaryWriter(
                out_path / split_name / result.name, fmt, random.Random(f"asm-corpus/{seed}/{result.name}/layout")
            )
            n_functions = n_instr = 0
            for n_instructions, text in fresh:
                writer.add(text, n_instructions)
                n_functions += 1
                n_instr += n_instructions
                lengths.append(n_instructions)
                if total_bytes + writer.pending_bytes >= max_bytes:
                    break
            writer.close()
            total_bytes += writer.bytes_written
            used.append(
                {
                    "name": result.name,
                    "path": result.path,
                    "split": split_name,
                    "fdes": result.n_fdes,
                    "functions": n_functions,
                    "instructions": n_instr,
                    "duplicates_dropped": binary_duplicates,
                    "short_dropped": result.n_short,
                    "files": writer.files,
                    "bytes": writer.bytes_written,
                }
            )
            if total_bytes >= max_bytes:
                break
    finally:
        results.close()  # stops the worker pool now rather than at garbage collection

    if not used:
        raise CorpusError("no functions found in the selected binaries")
    manifest = {
        "tool": "tools/asm_corpus.py",
        "seed": seed,
        "format": fmt,
        "max_mb": max_mb,
        "decoder": decoder_name,
        "n_fields": N_FIELDS,
        "field_names": list(FIELD_NAMES),
        "split": {
            "val_fraction": split,
            "train": [b["name"] for b in used if b["split"] == "train"],
            "val": [b["name"] for b in used if b["split"] == "val"],
        },
        "totals": {
            "binaries": len(used),
            "functions": len(lengths),
            "instructions": int(sum(lengths)),
            "duplicates_dropped": duplicates,
            "short_dropped": sum(b["short_dropped"] for b in used),
            "files": sum(b["files"] for b in used),
            "bytes": total_bytes,
        },
        "length_quantiles": _quantiles(lengths),
        "binaries": used,
        "binaries_without_new_functions": empty,
        "errors": errors,
    }
    with open(out_path / "manifest.json", "w", encoding="utf-8", newline="\n") as handle:
        json.dump(manifest, handle, indent=1)
        handle.write("\n")
    if verbose:
        q = manifest["length_quantiles"]
        t = manifest["totals"]
        print(
            f"asm_corpus: {t['bytes'] / 1e6:.1f} MB in {t['files']} files, {t['binaries']} binaries "
            f"({len(manifest['split']['val'])} val), {t['functions']} functions, {t['instructions']} instructions, "
            f"{t['duplicates_dropped']} duplicates dropped; length p50={q['p50']} p90={q['p90']} "
            f"p99={q['p99']} max={q['max']}; {time.perf_counter() - started:.1f} s ({decoder_name})"
        )
    return manifest


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(2, f"asm_corpus: error: {message}\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog="asm_corpus.py",
        description="Turn this machine's x86-64 binaries into a corpus of 28-dim instruction-vector sequences.",
    )
    parser.add_argument("--out", help="output folder (created; a previous corpus there is replaced)")
    parser.add_argument(
        "--max-mb", type=float, default=_DEFAULT_MAX_MB, help="stop after about this many MB (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for binary order, sampling, layout and split")
    parser.add_argument("--format", choices=FORMATS, default="mixed", help="file/record layout (default %(default)s)")
    parser.add_argument(
        "--binaries",
        nargs="+",
        metavar="PATH",
        help="ELF files or folders (default: " + ", ".join(DEFAULT_BINARY_DIRS) + ")",
    )
    parser.add_argument(
        "--split",
        type=float,
        default=0.0,
        metavar="VAL_FRACTION",
        help="fraction of binaries written to val/, whole binaries at a time (default 0)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs available)")
    parser.add_argument(
        "--decoder",
        choices=("auto", "iced", "objdump"),
        default="auto",
        help="instruction decoder (default %(default)s: iced-x86 if installed, else objdump)",
    )
    parser.add_argument(
        "--check", action="store_true", help="only report whether a corpus can be built here (exit 0 yes, 1 no)"
    )
    args = parser.parse_args(argv)
    if not args.check and not args.out:
        parser.error("the following arguments are required: --out")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.check:
        if available():
            print(f"asm_corpus: ready (decoder: {_resolve_decoder('auto')})")
            return 0
        missing = "a decoder (pip install iced-x86, or binutils)" if not decoder_available() else "x86-64 ELF binaries"
        print(f"asm_corpus: cannot build a corpus here: no {missing}", file=sys.stderr)
        return 1
    try:
        build_corpus(
            args.out,
            max_mb=args.max_mb,
            seed=args.seed,
            fmt=args.format,
            binaries=args.binaries,
            split=args.split,
            jobs=args.jobs,
            decoder=args.decoder,
            verbose=True,
        )
    except CorpusError as error:
        print(f"asm_corpus: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"asm_corpus: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
