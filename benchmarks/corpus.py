"""Benchmark corpora: real instruction sequences where the machine has them, else heavy-tailed synthetic ones.

    real       tools/asm_corpus on this machine's x86-64 binaries (iced-x86 or objdump), then convert
    synthetic  lognormal lengths with median 30 and p99 1000 (the shape of the real data), random walks

`--corpus auto` (every benchmark's default) takes real data when `asm_corpus.available()`, else synthetic.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tools/ is a package of the repository root; scripts start in benchmarks/
    sys.path.insert(0, str(ROOT))

from streamtrain.dataset import DatasetWriter  # noqa: E402
from tools import asm_corpus  # noqa: E402

KINDS = ("auto", "real", "synthetic")

__all__ = ["KINDS", "asm_corpus", "lognormal_lengths", "write_synthetic", "write_real", "build_dataset"]


def lognormal_lengths(num_sequences: int, seed: int, max_len: int = 30_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # median exp(mu) = 30; p99 = exp(mu + 2.326 sigma) = 1000
    mu, sigma = math.log(30), (math.log(1000) - math.log(30)) / 2.326
    return np.clip(np.round(rng.lognormal(mu, sigma, size=num_sequences)), 2, max_len).astype(np.int64)


def write_synthetic(root: Path, num_sequences: int, dim: int = 28, seed: int = 0) -> str:
    rng = np.random.default_rng(seed + 1)
    lengths = lognormal_lengths(num_sequences, seed)
    with DatasetWriter(root, dim=dim) as writer:
        for i, n in enumerate(lengths):
            writer.add(np.cumsum(rng.standard_normal((int(n), dim), dtype=np.float32) * 0.1, axis=0), path="synthetic", line=i + 1)
    return f"synthetic: {num_sequences} lognormal-length sequences (median 30, p99 ~1000), dim {dim}"


def write_real(root: Path, max_mb: float, seed: int = 0, json_dir: Path | None = None) -> str:
    """Build the instruction corpus as JSON/JSONL (kept in `json_dir` if given) and convert it into `root`."""
    from streamtrain.convert import convert

    json_dir = json_dir or root.with_name(root.name + "-json")
    totals = asm_corpus.build_corpus(json_dir, max_mb=max_mb, seed=seed, jobs=1)["totals"]
    convert([json_dir / "train"], root, workers=1)  # split 0: every record is in train/
    return f"real: {totals['functions']} functions from {totals['binaries']} binaries ({totals['bytes'] / 1e6:.1f} MB of JSON), dim 28"


def build_dataset(root: Path, kind: str, *, num_sequences: int, real_mb: float, dim: int = 28, seed: int = 0) -> str:
    """Write the benchmark dataset into `root`; return a one-line description of what it holds."""
    if kind not in KINDS:
        raise ValueError(f"corpus kind must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        kind = "real" if asm_corpus.available() else "synthetic"
    if kind == "real":
        return write_real(root, real_mb, seed)
    return write_synthetic(root, num_sequences, dim, seed)
