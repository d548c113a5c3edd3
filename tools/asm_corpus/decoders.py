"""Choosing a decoder (iced-x86 or objdump) and the public ``encode_bytes``."""

from __future__ import annotations

import numpy as np

from . import iced, objdump
from .errors import CorpusError
from .fields import N_FIELDS
from .rows import row_table

__all__ = ["decoder_available", "encode_bytes", "resolve_decoder"]


def decoder_available() -> bool:
    """Whether iced-x86 is importable or objdump is on PATH."""
    return iced.iced_x86 is not None or objdump.objdump_path() is not None


def resolve_decoder(decoder: str) -> str:
    """The decoder to use for "auto", "iced" or "objdump"; CorpusError if it is not available here."""
    if decoder == "auto":
        if iced.iced_x86 is not None:
            return "iced"
        if objdump.objdump_path() is not None:
            return "objdump"
        raise CorpusError("no x86 decoder: install iced-x86 (pip install iced-x86) or binutils (objdump)")
    if decoder == "iced":
        iced.require()
        return decoder
    if decoder == "objdump":
        if objdump.objdump_path() is None:
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
    name = resolve_decoder(decoder)
    table = row_table(name)
    table.maybe_trim()
    if name == "iced":
        row_ids = iced.function_row_ids(code, ip, table)
    else:
        row_ids = objdump.function_row_ids(code, ip, [(0, len(code))], table)[0]
    if not row_ids:
        return np.zeros((0, N_FIELDS), dtype=np.float32)
    return table.rows(row_ids)
