"""Benchmark corpora as JSON/JSONL: the real instruction corpus (tools/asm_corpus) where it can run, else a
generated one shaped like it (lognormal lengths, median ~30, p99 ~1000; mostly 0/1 and some 6-digit floats).

tools/ is a package of the repository root, importable when the command runs from a checkout; an installed
streamtrain elsewhere falls back to the generated corpus.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

__all__ = ["CORPUS_KINDS", "real_corpus_tool", "write_synthetic_json", "build_json_corpus", "json_bytes"]

CORPUS_KINDS = ("auto", "real", "synthetic")


def real_corpus_tool():
    """The tools.asm_corpus module when it is importable and can build a corpus on this machine, else None."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "tools" / "asm_corpus").is_dir() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))  # a source checkout: tools/ sits beside streamtrain/
    try:
        from tools import asm_corpus
    except ImportError:
        return None
    return asm_corpus if asm_corpus.available() else None


def write_synthetic_json(folder: Path, total_mb: float, dim: int = 28, seed: int = 0) -> None:
    """About `total_mb` MB of records like real encodings: .jsonl files and folders of single-record .json files."""
    rng = np.random.default_rng(seed)
    # A pool of vector texts; records sample rows from it (generation speed, not realism, is the limit here).
    ints = rng.integers(0, 2, size=(8192, dim - 6))
    floats = rng.random((8192, 6)) * 10.0 ** rng.integers(-3, 3, size=(8192, 6))
    pool = ["[" + ", ".join([*map(str, i), *(f"{x:.6g}" for x in f)]) + "]" for i, f in zip(ints, floats)]
    sigma = np.log(1000 / 30) / 2.326  # p99 / median of a lognormal = exp(2.326 sigma)
    # files of ~4 MB at full size, smaller for a tiny corpus so that it still has several files
    file_bytes = min(4e6, max(total_mb * 1e6 / 8, 20e3))
    folder.mkdir(parents=True, exist_ok=True)
    total, file_no = 0, 0

    def record() -> str:
        n = int(np.clip(rng.lognormal(np.log(30), sigma), 2, 20000))
        return "[" + ", ".join(pool[i] for i in rng.integers(0, len(pool), n)) + "]"

    while total < total_mb * 1e6:
        if file_no % 4 == 3:  # a folder of single-record .json files
            sub = folder / f"single-{file_no:04d}"
            sub.mkdir()
            size, k = 0, 0
            while size < file_bytes and k < 200:
                text = record()
                (sub / f"rec-{k:04d}.json").write_text(text)
                size, k = size + len(text), k + 1
        else:
            lines, size = [], 0
            while size < file_bytes:
                lines.append(record())
                size += len(lines[-1]) + 1
            (folder / f"part-{file_no:04d}.jsonl").write_text("\n".join(lines) + "\n")
        total += size
        file_no += 1


def build_json_corpus(folder: Path, kind: str, total_mb: float, seed: int = 0) -> tuple[Path, str]:
    """Write the corpus under `folder`; returns (folder of its records, one line saying what it is)."""
    if kind not in CORPUS_KINDS:
        raise ValueError(f"corpus kind must be one of {CORPUS_KINDS}, got {kind!r}")
    tool = real_corpus_tool() if kind in ("auto", "real") else None
    if kind == "real" and tool is None:
        from streamtrain.errors import UserError

        raise UserError("--corpus real: tools.asm_corpus cannot run here (run from the repository root, on a "
                        "machine with x86-64 binaries and iced-x86 or objdump)")
    if tool is not None:
        totals = tool.build_corpus(folder, total_mb, seed, "mixed", None, 0.0, jobs=1)["totals"]
        return folder / "train", (f"real: {totals['functions']:,} functions from {totals['binaries']} binaries "
                                  f"({totals['bytes'] / 1e6:.1f} MB of JSON)")
    write_synthetic_json(folder, total_mb, seed=seed)
    return folder, f"synthetic: lognormal lengths (median ~30, p99 ~1000), {json_bytes(folder) / 1e6:.1f} MB of JSON"


def json_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.suffix in (".json", ".jsonl"))
