"""RUN/metrics.jsonl: one JSON object per logged step, appended and flushed at once; its records."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from streamtrain.dataset import atomic_write_bytes

__all__ = ["training_record", "MetricsLog", "read_metrics"]


def training_record(
    step: int, epoch: int, loss: float | None, lr: float, grad_norm: float, rates: dict[str, Any], elapsed_s: float,
    peak_mem_mb: float,
) -> dict[str, Any]:
    """One metrics.jsonl line of a logged training step (`rates`: a ThroughputMeter snapshot; `loss` None
    when every step since the last log was skipped as non-finite)."""
    return {
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        **rates,
        "elapsed_s": elapsed_s,
        "peak_mem_mb": peak_mem_mb,
    }


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per logged step, appended and flushed at once so that a crash
    loses nothing already logged. Opening it for a resumed run drops the lines past the resumed step,
    rewriting the file atomically: a crash during the rewrite leaves the run's history as it was."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    continue  # a line cut by a crash
            atomic_write_bytes(self.path, "".join(k + "\n" for k in kept).encode())
        self._file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
