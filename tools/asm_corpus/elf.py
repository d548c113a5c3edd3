"""An x86-64 ELF image: the file mapped read-only, its loadable segments, sections and code ranges.

Only what the corpus needs: where virtual addresses live in the file, which ranges hold code, and
where the unwind tables are (eh_frame.py reads them).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["ElfImage", "Section", "is_x86_64_elf", "open_elf"]

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


class Section(NamedTuple):
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int


@dataclass
class ElfImage:
    data: bytes | mmap.mmap
    loads: list[tuple[int, int, int, int]]  # (vaddr, file offset, file size, flags)
    code_ranges: list[tuple[int, int]]  # executable [start, end) virtual ranges backed by file bytes
    sections: list[Section]
    eh_frame_hdr: tuple[int, int, int] | None  # the PT_GNU_EH_FRAME segment: (vaddr, file offset, size)

    def offset_of(self, vaddr: int, size: int = 1) -> int | None:
        """File offset of ``size`` bytes at ``vaddr``, or None if no loaded segment holds them all."""
        for seg_vaddr, seg_offset, seg_size, _ in self.loads:
            if seg_vaddr <= vaddr and vaddr + size <= seg_vaddr + seg_size:
                return seg_offset + (vaddr - seg_vaddr)
        return None

    def load_end(self, vaddr: int) -> int:
        """End of the file-backed part of the segment holding ``vaddr`` (``vaddr`` itself if none)."""
        for seg_vaddr, _, seg_size, _ in self.loads:
            if seg_vaddr <= vaddr < seg_vaddr + seg_size:
                return seg_vaddr + seg_size
        return vaddr

    def section(self, name: str) -> tuple[int, int] | None:
        """(vaddr, size) of the first section called ``name`` that has bytes in the file."""
        for section in self.sections:
            if section.name == name and section.type != _SHT_NOBITS and section.size:
                return section.addr, section.size
        return None

    def close(self) -> None:
        if isinstance(self.data, mmap.mmap):
            self.data.close()


def open_elf(path: str | os.PathLike) -> ElfImage:
    """Map an x86-64 ELF file and index its segments and sections.

    Raises ValueError, IndexError or struct.error for a malformed file.
    """
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


def _parse_elf(data: bytes | mmap.mmap) -> ElfImage:
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
    eh_frame_hdr: tuple[int, int, int] | None = None
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, _, p_filesz, _, _ = _ELF_PHDR.unpack_from(data, e_phoff + i * e_phentsize)
        if p_type == _PT_LOAD and p_filesz:
            loads.append((p_vaddr, p_offset, p_filesz, p_flags))
        elif p_type == _PT_GNU_EH_FRAME:
            eh_frame_hdr = (p_vaddr, p_offset, p_filesz)

    sections: list[Section] = []
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
            sections.append(Section(name, sh_type, sh_flags, sh_addr, sh_offset, sh_size))

    code_ranges = [
        (s.addr, s.addr + s.size)
        for s in sections
        if s.flags & _SHF_EXECINSTR and s.type != _SHT_NOBITS and s.size and s.addr
    ]
    if not code_ranges:  # no section headers (sstripped): fall back to executable segments
        code_ranges = [(vaddr, vaddr + size) for vaddr, _, size, flags in loads if flags & _PF_X]
    code_ranges.sort()
    return ElfImage(data=data, loads=loads, code_ranges=code_ranges, sections=sections, eh_frame_hdr=eh_frame_hdr)
