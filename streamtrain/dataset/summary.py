"""Dataset summary for `streamtrain inspect`: counts, shard table, length quantiles and histogram, statistics.

Reads index.json and the lengths file only (plus every shard with verify=True). Imports numpy and format;
never torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from streamtrain.dataset.index import ShardInfo, load_lengths, read_index
from streamtrain.dataset.schema import REJECTS_FILE
from streamtrain.dataset.verify import verify_dataset
from streamtrain.errors import DataError

__all__ = ["LengthSummary", "DatasetSummary", "length_summary", "summarize", "render_text"]


@dataclass
class LengthSummary:
    """Sequence lengths (vectors per sequence): quantiles and a histogram over log-spaced bins."""

    min: int
    p50: float
    p90: float
    p99: float
    max: int
    mean: float
    bin_edges: list[int]  # len(counts) + 1 edges; bin i holds lengths in [edges[i], edges[i+1])
    counts: list[int]

    def to_json(self) -> dict:
        return {
            "min": self.min, "p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max, "mean": self.mean,
            "histogram": {"bin_edges": self.bin_edges, "counts": self.counts},
        }


def length_summary(lengths: np.ndarray, max_bins: int = 16) -> LengthSummary:
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return LengthSummary(0, 0.0, 0.0, 0.0, 0, 0.0, [], [])
    lo, hi = int(lengths.min()), int(lengths.max())
    p50, p90, p99 = (float(q) for q in np.quantile(lengths, [0.5, 0.9, 0.99]))
    # Integer edges spaced evenly in log(length); lengths are heavy-tailed, so linear bins would hide the body.
    raw = np.geomspace(max(lo, 1), hi + 1, num=max_bins + 1)
    edges = np.unique(np.concatenate([[lo], np.ceil(raw[1:-1]).astype(np.int64), [hi + 1]]))
    counts = np.histogram(lengths, bins=edges)[0] if len(edges) > 1 else np.array([len(lengths)])
    return LengthSummary(lo, p50, p90, p99, hi, float(lengths.mean()), edges.tolist(), counts.tolist())


@dataclass
class DatasetSummary:
    root: str
    dim: int
    num_sequences: int
    num_tokens: int
    num_rejected: int
    num_records: int | None
    num_ignored_files: int | None
    bytes: int
    shards: list[ShardInfo]
    lengths: LengthSummary
    mean: list[float]
    std: list[float]
    rejects_file: str | None
    problems: list[str] | None = None  # filled by verify: one line per mismatch (empty: intact)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        obj = {
            "root": self.root,
            "dim": self.dim,
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "num_rejected": self.num_rejected,
            "num_records": self.num_records,
            "num_ignored_files": self.num_ignored_files,
            "bytes": self.bytes,
            "num_shards": len(self.shards),
            "shards": [s.to_json() for s in self.shards],
            "lengths": self.lengths.to_json(),
            "mean": self.mean,
            "std": self.std,
            "rejects_file": self.rejects_file,
        }
        if self.problems is not None:
            obj["verified"] = not self.problems
            obj["problems"] = self.problems
        return obj


def summarize(root: str | os.PathLike, verify: bool = False) -> DatasetSummary:
    """Summary of the dataset in `root`; with verify, every shard is re-read and checked against the index."""
    index = read_index(root)
    problems = verify_dataset(index) if verify else None
    try:
        lengths = np.asarray(load_lengths(index))
    except DataError:
        if not verify:
            raise
        lengths = np.zeros(0, np.int32)
    rejects = os.path.join(os.fspath(root), REJECTS_FILE)
    return DatasetSummary(
        root=os.fspath(root),
        dim=index.dim,
        num_sequences=index.num_sequences,
        num_tokens=index.num_tokens,
        num_rejected=index.num_rejected,
        num_records=index.extra.get("num_records"),
        num_ignored_files=index.extra.get("num_ignored_files"),
        bytes=sum(s.bytes for s in index.shards),
        shards=index.shards,
        lengths=length_summary(lengths),
        mean=[float(v) for v in index.mean],
        std=[float(v) for v in index.std],
        rejects_file=rejects if os.path.isfile(rejects) else None,
        problems=problems,
    )


def _bar(count: int, peak: int, width: int = 40) -> str:
    return "#" * (math.ceil(width * count / peak) if peak and count else 0)


def _length_line(L: LengthSummary) -> str:
    return f"min {L.min}  p50 {L.p50:g}  p90 {L.p90:g}  p99 {L.p99:g}  max {L.max}  mean {L.mean:.1f}"


def _histogram_rows(L: LengthSummary) -> list[tuple[int, int, int, str]]:
    """(lowest length, highest length, sequences, bar) per histogram bin (both bounds inclusive)."""
    peak = max(L.counts, default=0)
    return [(lo, hi - 1, c, _bar(c, peak)) for lo, hi, c in zip(L.bin_edges[:-1], L.bin_edges[1:], L.counts)]


def render_text(s: DatasetSummary) -> str:
    """Plain-text report (what `inspect` prints when stdout is not a terminal)."""
    out = [
        f"dataset   {s.root}",
        f"sequences {s.num_sequences:,}   tokens {s.num_tokens:,}   dim {s.dim}   shards {len(s.shards)}   "
        f"{s.bytes / 1e6:,.1f} MB",
    ]
    if s.num_records is not None:
        out.append(f"records   {s.num_records:,} seen, {s.num_rejected:,} rejected"
                   + (f", {s.num_ignored_files:,} files ignored" if s.num_ignored_files else "")
                   + (f"  (see {s.rejects_file})" if s.rejects_file else ""))
    else:
        out.append(f"rejected  {s.num_rejected:,}")
    out.append(f"length    {_length_line(s.lengths)}")
    rows = _histogram_rows(s.lengths)
    if rows:
        out.append("histogram (vectors per sequence)")
        for lo, hi, c, bar in rows:
            out.append(f"  {lo:>7}-{hi:<7} {c:>10,} {bar}")
    out.append("shards")
    out.append(f"  {'file':<40} {'sequences':>10} {'tokens':>12} {'MB':>9} {'first_id':>10}  sha256")
    for sh in s.shards:
        out.append(f"  {sh.file:<40} {sh.num_sequences:>10,} {sh.num_tokens:>12,} {sh.bytes / 1e6:>9.2f} "
                   f"{sh.first_id:>10,}  {sh.sha256[:12]}")
    out.append("per-dimension mean / std")
    for i, (m, sd) in enumerate(zip(s.mean, s.std)):
        out.append(f"  {i:>3} {m:>12.6g} {sd:>12.6g}")
    if s.problems is not None:
        out.append("verify    OK: every shard matches index.json" if not s.problems
                   else "verify    FAILED:\n" + "\n".join(f"  {p}" for p in s.problems))
    return "\n".join(out)
