"""What convert reports: progress events while it runs (`ConvertProgress`) and its result (`ConvertResult`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streamtrain import dataset

__all__ = ["ConvertProgress", "ConvertResult"]


class ConvertProgress:
    """Receives progress events; the CLI subclasses it to draw a bar. All methods are optional."""

    def start(self, total_bytes: int, total_files: int, reused_bytes: int) -> None:
        pass

    def advance(self, parsed_bytes: int, records: int, files: int) -> None:
        pass

    def stage(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class ConvertResult:
    out: Path
    index: dataset.Index
    num_records: int  # records seen = num_sequences + num_rejected
    num_sequences: int
    num_rejected: int
    num_ignored_files: int
    num_files: int
    num_tokens: int
    input_bytes: int  # bytes of every input file
    parsed_bytes: int  # bytes parsed in this run (0 when everything was reused)
    groups_built: int
    groups_reused: int
    workers: int
    backend: str
    elapsed_s: float
    rejects_path: Path | None
    # Records parsed in this run (reused groups not counted) by the block fast path, and one by one by the
    # precise path (every record of a block that held a bad or unusual one).
    num_records_fast: int = 0
    num_records_slow: int = 0

    @property
    def input_mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.elapsed_s, 1e-9)
