"""What a run shows while it trains (a rich bar on a terminal, one line per log step otherwise) and the
summary it prints when done."""

from __future__ import annotations

import statistics
import sys
from typing import Any

__all__ = ["LiveView", "format_rate", "summary_text"]


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
