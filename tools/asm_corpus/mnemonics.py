"""Mnemonic tables shared by both decoders, and the opcode class of a mnemonic (fields 0-11).

Names are lower case, as iced-x86 and objdump (Intel syntax) spell them.
"""

from __future__ import annotations

from .fields import (
    C_ARITH,
    C_CALL,
    C_COMPARE,
    C_COND_BRANCH,
    C_JUMP,
    C_LOGIC,
    C_MOVE,
    C_NOP,
    C_OTHER,
    C_RETURN,
    C_SIMD,
    C_X87,
)

__all__ = [
    "ALL_CONDITIONS",
    "CMOV_MNEMONICS",
    "COND_BRANCH_MNEMONICS",
    "SET_MNEMONICS",
    "STRING_COMPARE_MNEMONICS",
    "STRING_MOVE_MNEMONICS",
    "classify",
]

_CONDITION_CODES = ("o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g")
# objdump may print aliases for a few condition codes.
_CONDITION_ALIASES = ("c", "nc", "z", "nz", "nae", "nb", "na", "nbe", "pe", "po", "nge", "nl", "ng", "nle")
ALL_CONDITIONS = _CONDITION_CODES + _CONDITION_ALIASES

COND_BRANCH_MNEMONICS = frozenset(
    {"j" + cc for cc in ALL_CONDITIONS} | {"jcxz", "jecxz", "jrcxz", "loop", "loope", "loopne", "loopz", "loopnz"}
)
SET_MNEMONICS = frozenset("set" + cc for cc in ALL_CONDITIONS)
CMOV_MNEMONICS = frozenset("cmov" + cc for cc in ALL_CONDITIONS)
_RETURN_MNEMONICS = frozenset({"ret", "retf", "retq", "retn", "iret", "iretd", "iretq", "iretw"})
# iced reports syscall as a call and sysret as a return; they are OS gates, not control flow inside a program.
_SYSTEM_GATE_MNEMONICS = frozenset(
    {"syscall", "sysenter", "sysexit", "sysexitq", "sysret", "sysretq", "int", "int1", "into", "ud0", "ud1", "ud2"}
)
STRING_MOVE_MNEMONICS = frozenset(
    {
        "movs", "movsb", "movsw", "movsq", "stos", "stosb", "stosw", "stosd", "stosq", "lods", "lodsb", "lodsw",
        "lodsd", "lodsq",
    }
)
STRING_COMPARE_MNEMONICS = frozenset({"cmps", "cmpsb", "cmpsw", "cmpsq", "scas", "scasb", "scasw", "scasd", "scasq"})
# iced names the dword string ops MOVSD / CMPSD, like the SSE2 instructions; the
# SSE2 forms have xmm operands and are classified SIMD before these tables are
# consulted.  objdump spells the string forms "movs" / "cmps", so the fallback's
# string-op semantics (objdump.py) leave movsd / cmpsd out.
_MOVE_MNEMONICS = (
    frozenset(
        {
            "mov", "movabs", "movzx", "movsx", "movsxd", "movbe", "movnti", "xchg", "push", "pop",
            "pushf", "pushfq", "popf", "popfq", "leave", "enter", "cbw", "cwde", "cdqe", "cwd",
            "cdq", "cqo", "bswap", "lahf", "sahf", "xlat", "xlatb", "movsd",
        }
    )
    | STRING_MOVE_MNEMONICS
    | CMOV_MNEMONICS
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
    | STRING_COMPARE_MNEMONICS
    | SET_MNEMONICS
)
_NOP_MNEMONICS = frozenset({"nop", "nopw", "nopl", "endbr64", "endbr32", "int3"})
_X87_NOT_X87 = frozenset({"fxsave", "fxsave64", "fxrstor", "fxrstor64", "femms"})
_SIMD_WITHOUT_REGISTER = frozenset(
    {"vzeroupper", "vzeroall", "ldmxcsr", "stmxcsr", "vldmxcsr", "vstmxcsr", "emms", "femms"}
)


def classify(mnemonic: str, flow_class: int | None, uses_vector_register: bool) -> int:
    """Map a lower-case mnemonic (plus decoder flow info) to a class index.

    ``flow_class`` is the class the decoder derived from control flow (iced's
    FlowControl) or None for a plain instruction / a decoder that lacks it.
    """
    if mnemonic in _SYSTEM_GATE_MNEMONICS:
        return C_OTHER
    if mnemonic in _NOP_MNEMONICS:
        return C_NOP
    if flow_class is not None:
        return flow_class
    if mnemonic == "jmp":
        return C_JUMP
    if mnemonic == "call":
        return C_CALL
    if mnemonic in _RETURN_MNEMONICS:
        return C_RETURN
    if mnemonic in COND_BRANCH_MNEMONICS:
        return C_COND_BRANCH
    if mnemonic == "wait" or mnemonic == "fwait" or (mnemonic[:1] == "f" and mnemonic not in _X87_NOT_X87):
        return C_X87
    if uses_vector_register or mnemonic in _SIMD_WITHOUT_REGISTER:
        return C_SIMD
    if mnemonic in _MOVE_MNEMONICS:
        return C_MOVE
    if mnemonic in _ARITH_MNEMONICS:
        return C_ARITH
    if mnemonic in _LOGIC_MNEMONICS:
        return C_LOGIC
    if mnemonic in _COMPARE_MNEMONICS:
        return C_COMPARE
    return C_OTHER
