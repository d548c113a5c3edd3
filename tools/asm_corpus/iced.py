"""The iced-x86 decoder: exact operand, memory-access and flag semantics for every instruction.

iced-x86 is optional (the objdump fallback works without it); ``iced_x86`` is None where it is not
installed, and ``require()`` raises CorpusError there.
"""

from __future__ import annotations

import numpy as np

from .errors import CorpusError
from .fields import C_CALL, C_COND_BRANCH, C_JUMP, C_OTHER, C_RETURN, row_from_facts, signed
from .mnemonics import classify
from .rows import RowTable

try:  # The fast, precise decoder; optional so the objdump fallback can still work.
    import iced_x86
except ImportError:  # pragma: no cover - exercised only where iced-x86 is absent
    iced_x86 = None

__all__ = ["encode_instruction", "function_row_ids", "iced_x86", "require"]

# RFLAGS bits that count for fields 25/26: OF SF ZF AF CF PF DF IF AC (iced's
# RflagsBits layout).  The x87 condition codes C0-C3 and UIF are left out so x87
# compares do not look like integer flag producers.
_FLAG_MASK = 0x1FF


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
            fc.CONDITIONAL_BRANCH: C_COND_BRANCH,
            fc.UNCONDITIONAL_BRANCH: C_JUMP,
            fc.INDIRECT_BRANCH: C_JUMP,
            fc.CALL: C_CALL,
            fc.INDIRECT_CALL: C_CALL,
            fc.RETURN: C_RETURN,
            fc.INTERRUPT: C_OTHER,
            fc.XBEGIN_XABORT_XEND: C_OTHER,
            fc.EXCEPTION: C_OTHER,
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


_CONSTANTS: _IcedConstants | None = None


def _constants() -> _IcedConstants:
    global _CONSTANTS
    if iced_x86 is None:
        raise CorpusError("iced-x86 is not installed (pip install iced-x86)")
    if _CONSTANTS is None:
        _CONSTANTS = _IcedConstants()
    return _CONSTANTS


def require() -> None:
    """Raise CorpusError unless iced-x86 is importable."""
    _constants()


def _row(ins: "iced_x86.Instruction") -> tuple[float, ...]:
    k = _constants()
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
                immediate = signed(ins.immediate(i), bits)
            if i == 0:
                operand_bytes = bits // 8
        elif kind in k.branch_kinds:
            branch_offset = signed(ins.near_branch_target - ins.next_ip, 64)
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
            displacement = signed(ins.memory_displacement - ins.next_ip, 64)
        elif base in k.registers_32 or index in k.registers_32:
            # addr32 ("lea edx,[ecx-1]"): iced stores the displacement as a u32.
            displacement = signed(ins.memory_displacement, 32)
        else:
            displacement = signed(ins.memory_displacement, 64)

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

    return row_from_facts(
        cls=classify(mnemonic, k.flow_classes.get(ins.flow_control), vector),
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
    return np.asarray(_row(instruction), dtype=np.float32)


def function_row_ids(code: bytes, ip: int, table: RowTable) -> list[int]:
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
            row_id = table.add(key, _row(ins))
        row_ids.append(row_id)
    return row_ids
