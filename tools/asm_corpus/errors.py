"""The one exception type of the corpus builder: a problem the caller can fix."""

from __future__ import annotations

__all__ = ["CorpusError"]


class CorpusError(ValueError):
    """A problem the caller can fix (bad path, not an ELF, bad option value)."""
