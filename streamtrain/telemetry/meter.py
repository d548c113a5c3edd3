"""Throughput between two log points: real and padded tokens/s, pad share, data-wait share, MFU, peak memory.

Throughput counts *real* tokens: padding is work the hardware does for nothing, so it is reported apart
(`padded_tokens_per_s`, `pad_fraction`) instead of inflating the headline rate.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["ThroughputMeter", "peak_memory_mb"]


class ThroughputMeter:
    """Accumulates per-step counts between two log points; `snapshot()` returns rates and starts over.

    mfu = (model FLOPs done / elapsed s) / peak_flops_per_s. The FLOPs follow PaLM's appendix B with its
    non-causal attention term (the full l x l score matrix per sequence of length l; see
    `CausalTransformer.flops_per_token`), the convention nanoGPT's MFU uses. Under data parallelism pass
    the FLOPs of every rank and the peak of all devices together. `clock`: seconds (tests freeze it)."""

    def __init__(self, peak_flops_per_s: float | None = None, clock=time.perf_counter):
        self.peak_flops_per_s = peak_flops_per_s
        self._clock = clock
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self._start = now
        self.real_tokens = 0
        self.padded_tokens = 0
        self.data_wait_s = 0.0
        self.flops = 0.0

    def add(self, real_tokens: int, padded_tokens: int, data_wait_s: float, flops: float) -> None:
        self.real_tokens += real_tokens
        self.padded_tokens += padded_tokens
        self.data_wait_s += data_wait_s
        self.flops += flops

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (validation, checkpointing) out of the current interval's elapsed time."""
        self._start += seconds

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        elapsed_s = max(now - self._start, 1e-9)
        out = {
            "real_tokens": self.real_tokens,
            "real_tokens_per_s": self.real_tokens / elapsed_s,
            "padded_tokens_per_s": self.padded_tokens / elapsed_s,
            "pad_fraction": 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0,
            "data_wait_fraction": min(1.0, self.data_wait_s / elapsed_s),
            "mfu": (self.flops / elapsed_s) / self.peak_flops_per_s if self.peak_flops_per_s else None,
        }
        self._reset(now)
        return out


def peak_memory_mb(device) -> float:
    """Peak memory of this process so far: allocated tensors on CUDA, resident set size elsewhere [MiB]."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
