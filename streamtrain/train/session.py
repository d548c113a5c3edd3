"""What one `fit()` records and listens to: the live view, metrics.jsonl, the throughput meter and the loss
since the last log step (`FitTelemetry`), and SIGINT/SIGTERM (`StopSignals`)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import torch

from streamtrain.telemetry import (
    LiveView,
    MetricsLog,
    ThroughputMeter,
    peak_memory_mb,
    training_record,
)
from streamtrain.train.distributed import DistInfo, all_reduce_sum

__all__ = ["FitTelemetry", "StopSignals", "SIGNAL_EXIT"]

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class FitTelemetry:
    """Entered for one fit(): opens metrics.jsonl (dropping lines past `resume_step` of a resumed run) and
    starts the clock; leaving closes the view and the log."""

    def __init__(self, view: LiveView, metrics_path, resume_step: int | None, dist: DistInfo,
                 peak_flops_per_s: float | None, device: torch.device, saved_step: int, tensorboard_dir=None):
        self.view, self.dist, self.device = view, dist, device
        self._tensorboard_dir = tensorboard_dir  # also write the records as TensorBoard scalars there
        self.tensorboard = None
        self._metrics_args = (metrics_path, resume_step)
        self._peak = peak_flops_per_s
        self.last_record: dict | None = None
        self.last_val: dict | None = None
        self.saved_step = saved_step  # the step last.pt holds
        self._loss = torch.zeros((), device=device)
        self._steps = 0

    def __enter__(self) -> FitTelemetry:
        path, resume_step = self._metrics_args
        self.metrics = MetricsLog(path, resume_step=resume_step, enabled=self.dist.is_main)
        if self._tensorboard_dir is not None and self.dist.is_main:
            from streamtrain.telemetry.tensorboard import TensorBoardLog

            self.tensorboard = TensorBoardLog(self._tensorboard_dir)
        self.meter = ThroughputMeter(self._peak)
        self.start_s = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def close(self) -> None:
        self.view.close()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start_s

    def count_step(self, group: list, wait_s: float, loss: torch.Tensor | None, train_flops: Callable, step: int) -> None:
        """Tokens, padding, data wait and FLOPs of a step; its loss share unless the step was skipped (None)."""
        lengths = torch.cat([b.lengths for b in group])
        self.meter.add(int(lengths.sum()), sum(b.mask.numel() for b in group), wait_s, train_flops(lengths))
        if loss is not None:
            self._loss += loss
            self._steps += 1
        self.view.advance(step, self.elapsed_s())

    def record(self, step: int, epoch: int, lr: float, grad_norm: torch.Tensor) -> dict:
        """The metrics.jsonl line of this log step: one all-reduce for the job's loss (every rank's share of
        each step, averaged over the steps since the last log; None if every one was skipped) and its token
        and FLOP counts."""
        meter = self.meter
        packed = torch.cat([
            self._loss.reshape(1).to(torch.float64),
            torch.tensor([meter.real_tokens, meter.padded_tokens, meter.flops], dtype=torch.float64, device=self.device),
        ])
        loss_sum, real_tokens, padded_tokens, flops = all_reduce_sum(self.dist, packed).tolist()
        loss = loss_sum / self._steps if self._steps else None
        meter.real_tokens, meter.padded_tokens, meter.flops = int(real_tokens), int(padded_tokens), flops
        self._loss.zero_()
        self._steps = 0
        return training_record(step, epoch, loss, lr, float(grad_norm), meter.snapshot(), self.elapsed_s(),
                               peak_memory_mb(self.device))

    def write(self, record: dict | None) -> None:
        if record is None:
            return
        self.metrics.write(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        if "loss" in record:
            self.view.log(record)
            self.last_record = record

    def excluded(self) -> _Excluded:
        """A block whose time (validation, checkpointing) is left out of the throughput interval."""
        return _Excluded(self.meter)


class _Excluded:
    def __init__(self, meter: ThroughputMeter):
        self.meter = meter

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.meter.exclude(time.perf_counter() - self.t0)


class StopSignals:
    """SIGINT/SIGTERM while entered: the first calls `on_signal(signum)` (the run finishes its step, saves
    and exits); a second stops at once. Installed only from the main thread (where Python allows it)."""

    def __init__(self, on_signal: Callable[[int], None]):
        self.on_signal = on_signal
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNAL_EXIT:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum
        self.on_signal(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
