"""Parsing objdump's Intel-syntax text: prefixes, operands, memory operands, predicate pseudo-ops.

Pure text functions with no knowledge of what an instruction does (objdump.py holds the semantics).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .fields import signed

__all__ = [
    "NUMBER",
    "REGISTER_BYTES",
    "VECTOR_REGISTER",
    "MemoryOperand",
    "expand_pseudo_op",
    "parse_memory_operand",
    "split_instruction_text",
    "split_operands",
]

_PREFIXES = frozenset(
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
NUMBER = re.compile(r"^-?(?:0x[0-9a-f]+|[0-9]+)$")
VECTOR_REGISTER = re.compile(r"\b(?:[xyz]mm[0-9]+|mm[0-7]|k[0-7])\b")


def _register_sizes() -> dict[str, int]:
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


REGISTER_BYTES = _register_sizes()


def split_operands(text: str) -> list[str]:
    """Split an operand list at the commas outside brackets ("[rax+rbx*2],xmm0" -> 2 operands)."""
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
class MemoryOperand:
    """What fields 18-22 need from a memory operand."""

    n_bytes: int = 0
    rip_relative: bool = False
    has_index: bool = False
    scale: int = 1
    displacement: int = 0
    index_is_vector: bool = False


def parse_memory_operand(operand: str) -> MemoryOperand | None:
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
        if colon and seg in REGISTER_BYTES and NUMBER.match(number):
            return MemoryOperand(n_bytes=n_bytes, displacement=signed(int(number, 0), 64))
        return None
    inner = text[bracket + 1 : text.rfind("]")]
    memory = MemoryOperand(n_bytes=n_bytes)
    saw_base = False
    for sign, term in re.findall(r"([+-]?)([^+-]+)", inner):
        term = term.strip()
        if "*" in term:
            register, _, factor = term.partition("*")
            memory.has_index = True
            memory.scale = int(factor)
            memory.index_is_vector = register[:1] in "xyz" and register[1:3] == "mm"
        elif NUMBER.match(term):
            value = int(term, 0)
            memory.displacement = signed(-value if sign == "-" else value, 64)
        elif term == "rip" or term == "eip":
            memory.rip_relative = True
        elif term in REGISTER_BYTES:
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


def expand_pseudo_op(mnemonic: str) -> tuple[str, int | None]:
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


def split_instruction_text(text: str) -> tuple[str, str] | None:
    """'rep stos QWORD PTR es:[rdi],rax  # c' -> ('stos', 'QWORD PTR es:[rdi],rax'); None if invalid."""
    text = text.split("#", 1)[0]
    text = re.sub(r"\s*<[^>]*>", "", text).strip()
    while True:
        head, _, rest = text.partition(" ")
        if head in _PREFIXES or head.startswith("rex"):
            text = rest.strip()
            if not text:  # a lone prefix byte: decoders treat it as garbage
                return None
            continue
        break
    if not head or head.startswith("(bad)") or head == ".byte":
        return None
    return head.lower(), rest.strip()
