"""A per-process cache: instruction bytes -> row id, with the float32 row and JSON text of each id.

Rows depend only on the instruction bytes, and real code repeats the same
encodings constantly (push rbp, mov rax,rbx, ...), so each distinct byte string
is analysed once per process and decoder.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .fields import N_FIELDS, row_text

__all__ = ["RowTable", "row_table"]


class RowTable:
    """Instruction bytes -> row id; ``rows(ids)`` gives float32 rows, ``texts[id]`` their JSON text."""

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
        self.texts.append(row_text(row))
        self.ids[key] = row_id
        return row_id

    def rows(self, row_ids: Sequence[int]) -> np.ndarray:
        return self._rows[np.asarray(row_ids, dtype=np.intp)]

    def maybe_trim(self) -> None:
        # Bounded memory in long runs; ids are only valid within one function,
        # so clearing between functions is safe.
        if len(self.texts) > self._MAX_ENTRIES:
            self.clear()


_TABLES: dict[str, RowTable] = {}


def row_table(decoder: str) -> RowTable:
    """This process's table for ``decoder`` ("iced" or "objdump"): the decoders may differ on a row."""
    table = _TABLES.get(decoder)
    if table is None:
        table = _TABLES[decoder] = RowTable()
    return table
