"""Function ranges from ``.eh_frame``: the CIE/FDE records of the unwind tables.

System binaries are stripped, so symbols are useless, but unwind tables are always kept: every FDE
gives one function's [start, end).  Without section headers, ``.eh_frame`` is found through the
PT_GNU_EH_FRAME segment (``.eh_frame_hdr``).
"""

from __future__ import annotations

import mmap
import os
import struct

from .elf import ElfImage, is_x86_64_elf, open_elf
from .errors import CorpusError

__all__ = ["function_ranges", "functions_from_eh_frame"]

# Hand-written rather than pyelftools: measured on 41 binaries from /usr/bin, pyelftools gives
# identical function ranges but takes about 40x the time (9.5 s vs 0.24 s).


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


def _locate(image: ElfImage) -> tuple[int, int] | None:
    """(vaddr, size) of ``.eh_frame``: its section, else the table ``.eh_frame_hdr`` points at."""
    section = image.section(".eh_frame")
    if section is not None or image.eh_frame_hdr is None:
        return section
    data = image.data
    hdr_vaddr, hdr_offset, hdr_size = image.eh_frame_hdr
    if hdr_size >= 8 and data[hdr_offset] == 1:
        pointer, _ = _read_encoded(data, hdr_offset + 4, data[hdr_offset + 1], hdr_vaddr + 4, hdr_vaddr)
        if pointer is not None and image.offset_of(pointer) is not None:
            return pointer, image.load_end(pointer) - pointer
    return None


def _fde_ranges(image: ElfImage) -> list[tuple[int, int]]:
    eh_frame = _locate(image)
    if eh_frame is None:
        return []
    vaddr, size = eh_frame
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


def function_ranges(image: ElfImage) -> list[tuple[int, int]]:
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
        image = open_elf(path)
        try:
            return function_ranges(image)
        finally:
            image.close()
    except (ValueError, IndexError, struct.error) as error:
        raise CorpusError(f"{path}: malformed ELF or .eh_frame ({error})") from None
