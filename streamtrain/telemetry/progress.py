"""A progress bar for the commands that run a model over a dataset (predict, embed): rich on a terminal
(stderr, so the command's own output stays clean), nothing otherwise."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(total: int, label: str, quiet: bool = False, stream=None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`, which moves a bar of `total` units labelled `label` on by n."""
    stream = stream or sys.stderr
    if quiet or not stream.isatty():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(file=stream), transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n=1: progress.advance(task, n)
