"""Finding binaries: the x86-64 ELF files in the default folders or the ones the caller names."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from .decoders import decoder_available
from .elf import is_x86_64_elf
from .errors import CorpusError

__all__ = ["DEFAULT_BINARY_DIRS", "available", "candidate_paths", "find_binaries"]

DEFAULT_BINARY_DIRS: tuple[str, ...] = ("/usr/bin", "/usr/lib/x86_64-linux-gnu")


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


def _listed_files(dirs: Iterable[str | os.PathLike]) -> list[str]:
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


def candidate_paths(paths: Sequence[str | os.PathLike] | None) -> list[str]:
    """Candidate files in a fixed order: explicit files must be ELF x86-64, dirs are scanned.

    ``None`` means the default dirs.  Folder entries are not checked for ELF here (the build
    skips the rest); CorpusError for a missing path or a named file that is not x86-64 ELF.
    """
    if paths is None:
        return _listed_files(DEFAULT_BINARY_DIRS)
    result: list[str] = []
    seen: set[str] = set()
    for raw in paths:
        path = os.fspath(raw)
        if os.path.isdir(path):
            for candidate in _listed_files([path]):
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
