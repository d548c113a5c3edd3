"""Training telemetry: throughput (real and padded tokens/s, pad share, data-wait share, MFU), the peak MFU
is quoted against (a GPU datasheet table, else a measured matmul), RUN/metrics.jsonl and its records, the loss plot, the live view on a terminal, and
the summary printed at the end.

Throughput counts *real* tokens: padding is work the hardware does for nothing, so it is reported apart
(`padded_tokens_per_s`, `pad_fraction`) instead of inflating the headline rate.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from streamtrain.dataset import atomic_write_bytes

__all__ = [
    "ThroughputMeter",
    "MetricsLog",
    "LiveView",
    "measure_matmul_peak_tflops",
    "gpu_peak_tflops",
    "device_peak_tflops",
    "plot_loss",
    "format_rate",
    "read_metrics",
    "peak_memory_mb",
    "training_record",
    "summary_text",
]


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


def measure_matmul_peak_tflops(size: int | None = None, budget_s: float = 0.2, dtype=None, device=None) -> float:
    """Median TFLOP/s of a (size x size) @ (size x size) matmul in `dtype` (default fp32) on `device`
    (default CPU) over ~budget_s: the attainable peak MFU is quoted against where no datasheet figure
    applies (no table covers every CPU and thread count, nor every GPU). `size` defaults to 1024 on a CPU
    and 8192 on a GPU, large enough to reach the tensor cores' rate."""
    import torch

    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    # never touch the global RNG: the training stream must not depend on this
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=device).to(dtype)
    out = torch.empty(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b, out=out)  # warm up the kernel selection and caches
    sync()
    repeats = 1
    if device.type == "cuda":  # one launch is short next to a host sync: time a few per reading
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        repeats = max(1, min(50, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
    rates = []
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or len(rates) < 3:
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        sync()
        rates.append(repeats * 2.0 * size**3 / (time.perf_counter() - t0) / 1e12)
    rates.sort()
    return rates[len(rates) // 2]


# Dense peak TFLOP/s (no structured sparsity: datasheets quote "X | 2X*" or "2X with sparsity"; the
# table holds X) by the exact name torch.cuda.get_device_name() reports, normalized by _gpu_key.
# bf16/fp16: tensor cores with fp32 accumulation, what autocast matmuls use (GeForce cards run those at
# half their fp16-accumulate rate); tf32: fp32 matmuls when torch allows TF32; fp32: without tensor cores.
# A precision the GPU has no units for (bf16 before Ampere) is absent, and then measured like an unknown GPU.
# Sources: NVIDIA datasheets (H100, H200, GH200, A100, A10, L4, L40, L40S, V100, T4), NVIDIA architecture
# whitepapers (GA102 for the RTX 3090, AD102 for the RTX 4090, RTX A6000); the A10G, made for AWS, has no
# NVIDIA datasheet: AWS G5 / vendor spec tables.
_HOPPER_SXM = {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}
_HOPPER_NVL = {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}
_A100 = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}
_V100_SXM2 = {"fp16": 125.0, "fp32": 15.7}
_V100_PCIE = {"fp16": 112.0, "fp32": 14.0}
_GPU_PEAKS_BY_NAME = {
    "NVIDIA H100 80GB HBM3": _HOPPER_SXM,  # H100 SXM5
    "NVIDIA H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "NVIDIA H100 NVL": _HOPPER_NVL,
    "NVIDIA H200": _HOPPER_SXM,  # H200 SXM: the H100 SXM's compute, more and faster memory
    "NVIDIA H200 NVL": _HOPPER_NVL,
    "NVIDIA GH200 480GB": _HOPPER_SXM,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "NVIDIA A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 35.0},
    "NVIDIA L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "NVIDIA L40": {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5},
    "NVIDIA L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "Tesla V100-SXM2-16GB": _V100_SXM2,
    "Tesla V100-SXM2-32GB": _V100_SXM2,
    "Tesla V100-PCIE-16GB": _V100_PCIE,
    "Tesla V100-PCIE-32GB": _V100_PCIE,
    "Tesla V100S-PCIE-32GB": {"fp16": 130.0, "fp32": 16.4},
    "Tesla T4": {"fp16": 65.0, "fp32": 8.1},
    "NVIDIA GeForce RTX 3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
    "NVIDIA GeForce RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "NVIDIA RTX A6000": {"bf16": 154.8, "fp16": 154.8, "fp32": 38.7},
}


def _gpu_key(device_name: str) -> str:
    return " ".join(device_name.split()).casefold()


_GPU_PEAKS = {_gpu_key(name): peaks for name, peaks in _GPU_PEAKS_BY_NAME.items()}


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """Datasheet dense peak of the GPU named exactly `device_name` (torch.cuda.get_device_name(); case and
    spacing do not matter) at `precision` ('bf16', 'fp16', 'tf32', 'fp32'); None when the name is not in
    the table or the GPU has no units for that precision. Names are never matched in part: "NVIDIA L40S"
    is not an L4 and "NVIDIA H100 PCIe" not an H100 SXM."""
    return _GPU_PEAKS.get(_gpu_key(device_name), {}).get(precision)


def device_peak_tflops(device, precision: str, device_name: str | None = None, measure=None) -> float:
    """The peak MFU divides by on `device` when training in `precision` [TFLOP/s]: on a GPU the datasheet
    figure of its exact model (fp32 counts as tf32 where torch lets matmuls use TF32), else a matmul
    measured on the device in the training precision; on a CPU always measured, fp32 for fp16 (emulated
    there: no fp16 matmul units). `device_name` defaults to torch's, `measure` (size/budget_s/dtype/device
    keywords, TFLOP/s) to measure_matmul_peak_tflops."""
    import torch

    device = torch.device(device)
    measure = measure or measure_matmul_peak_tflops
    if device.type != "cuda":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return measure(dtype=dtype, device=device)
    key = precision
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    peak = gpu_peak_tflops(device_name or torch.cuda.get_device_name(device), key)
    if peak is not None:
        return peak
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return measure(dtype=dtype, device=device)


def peak_memory_mb(device) -> float:
    """Peak memory of this process so far: allocated tensors on CUDA, resident set size elsewhere [MiB]."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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


def summary_text(
    steps: int, last_record: dict | None, last_val: dict | None, records: list[dict], run_dir, plot_line: str,
    skipped_steps: int | None = None,
) -> str:
    """The lines `fit` prints when it is done: steps and final loss (and, with --nonfinite skip, the steps
    skipped), validation against the baselines, the median real tokens/s of `records` (metrics.jsonl), the
    run folder and what became of the plot."""
    show = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    first = f"done: {steps} steps"
    if last_record and last_record.get("loss") is not None:
        first += f" | final loss {last_record['loss']:.4g}"
    if skipped_steps is not None:
        first += f" | {skipped_steps} non-finite steps skipped"
    lines = [first]
    if last_val is not None:
        lines.append(
            f"validation: mse {last_val['mse']:.4g} (original units) | skill vs persistence "
            f"{show(last_val['skill_vs_persistence'])} | vs mean {show(last_val['skill_vs_mean'])}"
        )
    rates = [r["real_tokens_per_s"] for r in records if r.get("real_tokens_per_s")]
    if rates:
        lines.append(f"median real tokens/s: {statistics.median(rates):.0f}")
    lines.append(f"run folder: {run_dir}")
    lines.append(plot_line)
    return "\n".join(lines)


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


def plot_loss(run_dir: str | os.PathLike) -> str:
    """Write RUN/loss.png (training loss and validation MSE against step); return a line saying what was done."""
    run_dir = Path(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss plot skipped: matplotlib is not installed (pip install 'streamtrain[plot]')"
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        return "loss plot skipped: nothing was logged"
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (standardized MSE)")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss (standardized MSE)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    tmp = run_dir / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return f"loss plot: {out}"


def format_rate(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class LiveView:
    """A rich progress bar (ETA, loss, real tok/s, pad %, data-wait %) on a terminal; one plain line per log
    otherwise; nothing when quiet.

    Progress counts steps, or with a time budget (`max_seconds`, as --max-seconds) training time: elapsed
    of the budget, and the time left is the budget's, or the step limit's when that is predicted to come
    first. A budget usually ends the run long before the step total, which is then not worth showing."""

    def __init__(self, total_steps: int, start_step: int, quiet: bool, stream=None, max_seconds: float | None = None):
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.total_steps = total_steps
        self.start_step = start_step
        self.max_seconds = max_seconds
        self._progress = None
        if not quiet and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            if max_seconds is None:
                columns = (MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
                total, completed = total_steps, start_step
            else:
                columns = (TextColumn("{task.fields[budget]}"), TextColumn("{task.fields[stats]}"))
                total, completed = max_seconds, 0.0
            self._progress = Progress(TextColumn("[bold]fit"), BarColumn(), *columns, console=Console(file=self.stream))
            self._task = self._progress.add_task(
                "fit", total=total, completed=completed, stats="", budget=self._budget_text(start_step, 0.0)
            )
            self._progress.start()

    @property
    def bar_position(self) -> tuple[float, float] | None:
        """(completed, total) of the bar: steps, or seconds with a time budget; None without a bar."""
        if self._progress is None:
            return None
        task = self._progress.tasks[0]
        return task.completed, task.total

    def print(self, line: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(line)
        else:
            print(line, file=self.stream, flush=True)

    def remaining_s(self, step: int, elapsed_s: float) -> float:
        """Seconds left with a time budget: the budget's, or less when the step limit comes first at the mean
        step time so far."""
        left_s = max(self.max_seconds - elapsed_s, 0.0)
        steps_done = step - self.start_step
        if steps_done > 0:
            left_s = min(left_s, (self.total_steps - step) * elapsed_s / steps_done)
        return left_s

    def _budget_text(self, step: int, elapsed_s: float) -> str:
        share = min(elapsed_s / self.max_seconds, 1.0) if self.max_seconds else 0.0
        return (
            f"step {step} | {_duration(elapsed_s)} of {_duration(self.max_seconds or 0.0)} ({100 * share:.0f}%) | "
            f"ETA {_duration(self.remaining_s(step, elapsed_s) if self.max_seconds else 0.0)}"
        )

    def advance(self, step: int, elapsed_s: float = 0.0) -> None:
        """`elapsed_s`: training time so far (what --max-seconds counts)."""
        if self._progress is None:
            return
        if self.max_seconds is None:
            self._progress.update(self._task, completed=step)
        else:
            self._progress.update(
                self._task, completed=min(elapsed_s, self.max_seconds), budget=self._budget_text(step, elapsed_s)
            )

    def log(self, record: dict[str, Any]) -> None:
        """Show a metrics record (training_record: `step`, `elapsed_s`, the rates, ...)."""
        parts = [f"loss {record['loss']:.4g}" if record["loss"] is not None else "loss n/a (steps skipped)"]
        parts.append(f"{format_rate(record['real_tokens_per_s'])} real tok/s")
        parts.append(f"pad {100 * record['pad_fraction']:.0f}%")
        parts.append(f"data-wait {100 * record['data_wait_fraction']:.0f}%")
        if record.get("mfu") is not None:
            parts.append(f"mfu {100 * record['mfu']:.0f}%")
        if record.get("val_mse") is not None:
            parts.append(f"val mse {record['val_mse']:.4g}")
        stats = " | ".join(parts)
        step, elapsed_s = record["step"], record.get("elapsed_s", 0.0)
        if self._progress is not None:
            self.advance(step, elapsed_s)
            self._progress.update(self._task, stats=stats)
        elif not self.quiet:
            where = f"step {step}/{self.total_steps}" if self.max_seconds is None else self._budget_text(step, elapsed_s)
            print(f"{where} | epoch {record['epoch']} | lr {record['lr']:.2e} | {stats}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
