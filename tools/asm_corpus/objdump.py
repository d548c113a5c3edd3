"""The objdump fallback decoder: binutils' linear sweep, with memory-access and flag semantics from tables.

Coarser than iced-x86 (the tables cover what compilers emit), same 28 fields; one objdump process
decodes a batch of functions laid end to end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Iterator, Sequence

from .errors import CorpusError
from .fields import C_COND_BRANCH, C_X87, row_from_facts, signed
from .intel_syntax import (
    NUMBER,
    REGISTER_BYTES,
    VECTOR_REGISTER,
    MemoryOperand,
    expand_pseudo_op,
    parse_memory_operand,
    split_instruction_text,
    split_operands,
)
from .mnemonics import (
    ALL_CONDITIONS,
    CMOV_MNEMONICS,
    COND_BRANCH_MNEMONICS,
    SET_MNEMONICS,
    STRING_COMPARE_MNEMONICS,
    STRING_MOVE_MNEMONICS,
    classify,
)
from .rows import RowTable

__all__ = ["function_row_ids", "objdump_path"]

# Semantic tables (iced computes these exactly).
_FLAG_READERS = (
    frozenset(
        {
            "adc", "sbb", "rcl", "rcr", "pushf", "pushfq", "lahf", "cmc", "into", "adcx", "adox",
            "loope", "loopne", "loopz", "loopnz", "fcmovb", "fcmovbe", "fcmove", "fcmovnb", "fcmovnbe",
            "fcmovne", "fcmovnu", "fcmovu", "syscall",
        }
    )
    | {"j" + cc for cc in ALL_CONDITIONS}
    | SET_MNEMONICS
    | CMOV_MNEMONICS
    | STRING_MOVE_MNEMONICS  # the direction flag
    | STRING_COMPARE_MNEMONICS
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
) | STRING_COMPARE_MNEMONICS
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


def _row(mnemonic: str, operand_text: str, address: int, length: int) -> tuple[float, ...]:
    """The 28 fields of one instruction objdump printed as ``mnemonic operand_text`` at ``address``."""
    operands = split_operands(operand_text)
    mnemonic, predicate = expand_pseudo_op(mnemonic)
    if predicate is not None:
        operands.append(hex(predicate))
    # "xchg ax,ax" is objdump's spelling of the two-byte nop (66 90).
    if mnemonic == "xchg" and operands == ["ax", "ax"]:
        mnemonic, operands = "nop", []
    is_branch = mnemonic in ("jmp", "call") or mnemonic in COND_BRANCH_MNEMONICS or mnemonic == "xbegin"
    next_ip = address + length
    n_registers = 0
    vector = False
    immediate_text: str | None = None
    memory: MemoryOperand | None = None
    memory_position = -1
    operand_bytes = 0
    branch_offset = 0
    first_width = 0  # bytes of the first register / memory operand, for immediate sign
    for position, raw in enumerate(operands):
        operand = re.sub(r"\{[^}]*\}", "", raw).strip()  # EVEX masks "{k1}{z}", broadcasts "{1to16}"
        if operand in REGISTER_BYTES:
            n_registers += 1
            size = REGISTER_BYTES[operand]
            vector = vector or VECTOR_REGISTER.search(operand) is not None
            if position == 0:
                operand_bytes = first_width = size
        elif NUMBER.match(operand):
            if is_branch:
                branch_offset = signed(int(operand, 0) - next_ip, 64)
                if position == 0:
                    operand_bytes = 8
            else:
                if immediate_text is None:
                    immediate_text = operand
                if position == 0:
                    operand_bytes = 2 if mnemonic in ("ret", "retf", "enter") else (8 if mnemonic == "push" else 1)
        else:
            parsed = parse_memory_operand(operand)
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
        immediate = signed(value, bits)

    cls = classify(mnemonic, None, vector)
    memory_read = memory_write = False
    memory_bytes = 0
    if memory is not None and mnemonic not in _NO_ACCESS_MNEMONICS:
        string_op = mnemonic in STRING_MOVE_MNEMONICS or mnemonic in STRING_COMPARE_MNEMONICS
        if string_op:
            memory_read = mnemonic not in ("stos", "stosb", "stosw", "stosd", "stosq")
            memory_write = mnemonic in ("movs", "movsb", "movsw", "movsq", "stos", "stosb", "stosw", "stosd", "stosq")
        elif memory_position > 0:
            memory_read = True
            # mov*/cvt* stores never have the memory second; xchg/xadd/cmpxchg do and write it back.
            memory_write = mnemonic in ("xchg", "xadd", "cmpxchg")
        elif mnemonic in _STORE_ONLY_MNEMONICS or mnemonic.startswith(_STORE_ONLY_PREFIXES):
            memory_write = True
        elif mnemonic in _LOAD_ONLY_MNEMONICS or cls == C_X87 or cls == C_COND_BRANCH:
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

    return row_from_facts(
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


_OUTPUT_LINE = re.compile(r"^\s*([0-9a-f]+):\t([0-9a-f]{2}(?: [0-9a-f]{2})*)\s*\t(.*)$")


def objdump_path() -> str | None:
    """objdump on PATH, or None."""
    return shutil.which("objdump")


def _decode(blob: bytes, base_ip: int) -> Iterator[tuple[int, int, str, str]]:
    """Linear-sweep ``blob`` with objdump; yield (offset, length, mnemonic, operands).

    An undecodable instruction yields mnemonic "" so callers can stop there.
    """
    objdump = objdump_path()
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
        match = _OUTPUT_LINE.match(line)
        if match is None:
            continue
        address = int(match.group(1), 16)
        length = (len(match.group(2)) + 1) // 3
        parts = split_instruction_text(match.group(3))
        if parts is None:
            yield address - base_ip, length, "", ""
        else:
            yield address - base_ip, length, parts[0], parts[1]


def function_row_ids(
    blob: bytes, base_ip: int, bounds: Sequence[tuple[int, int]], table: RowTable
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
    for offset, length, mnemonic, operands in _decode(blob, base_ip):
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
            row_id = table.add(key, _row(mnemonic, operands, base_ip + offset, length))
        results[current].append(row_id)
        if expected == end:
            closed[current] = True
    return results
