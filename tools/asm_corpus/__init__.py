"""Build a corpus of instruction-vector sequences from this machine's x86-64 binaries.

Each sample is one machine-code function (its ``.eh_frame`` range), one vector of 28 floats per
instruction (fields.py documents them), decoded with iced-x86 when it is importable, else objdump.

    python -m tools.asm_corpus --out DIR [--max-mb N] [--seed S] [--format mixed|json|object|jsonl]
        [--binaries PATH ...] [--split F] [--test-split F] [--jobs N] [--decoder auto|iced|objdump]
    python -m tools.asm_corpus --check     # exit 0 if a corpus can be built here
    from tools import asm_corpus          # with the repository root on sys.path
    if asm_corpus.available():
        manifest = asm_corpus.build_corpus("data/asm", max_mb=30, seed=0)
"""

from .build import build_corpus
from .cli import main
from .decoders import decoder_available, encode_bytes
from .discover import DEFAULT_BINARY_DIRS, available, find_binaries
from .eh_frame import functions_from_eh_frame
from .elf import is_x86_64_elf
from .errors import CorpusError
from .fields import CLASS_NAMES, FIELD_NAMES, N_FIELDS
from .iced import encode_instruction
from .write import FORMATS

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_BINARY_DIRS",
    "FIELD_NAMES",
    "FORMATS",
    "N_FIELDS",
    "CorpusError",
    "available",
    "build_corpus",
    "decoder_available",
    "encode_bytes",
    "encode_instruction",
    "find_binaries",
    "functions_from_eh_frame",
    "is_x86_64_elf",
    "main",
]
