"""Per-binary work: decode and encode one binary's functions within its byte budget, in worker processes.

Functions are visited in a seeded order and kept until the budget is spent, so a big library
contributes a random sample; results come back in task order, whatever the number of workers.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import random
import struct
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from . import iced, objdump
from .eh_frame import function_ranges
from .elf import open_elf
from .fields import MAX_INSTRUCTION_BYTES
from .rows import row_table

__all__ = ["BinaryResult", "BinaryTask", "default_jobs", "encode_binaries", "encode_binary"]


@dataclass
class BinaryTask:
    path: str
    name: str
    seed: int
    max_bytes: int
    max_functions: int | None
    decoder: str


@dataclass
class BinaryResult:
    path: str
    name: str
    n_fdes: int = 0
    n_short: int = 0  # functions dropped for having < 2 instructions
    # (start vaddr, n_instructions, float32 digest, array text), sorted by start
    functions: list[tuple[int, int, bytes, str]] = field(default_factory=list)
    error: str | None = None


def _digest(rows: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(rows, dtype=np.float32).tobytes(), digest_size=16).digest()


def encode_binary(task: BinaryTask) -> BinaryResult:
    """Decode and encode the functions of one binary within its byte budget."""
    result = BinaryResult(path=task.path, name=task.name)
    try:
        image = open_elf(task.path)
    except (OSError, ValueError, IndexError, struct.error) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    try:
        ranges = function_ranges(image)
    except (ValueError, IndexError, struct.error) as error:
        # System binaries are not all well formed; one bad .eh_frame must not stop the corpus.
        image.close()
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.n_fdes = len(ranges)
    # Visit functions in a seeded order and stop at the budget, so a big library
    # contributes a random sample rather than its first N functions.
    order = list(range(len(ranges)))
    random.Random(f"asm-corpus/{task.seed}/{task.name}/functions").shuffle(order)
    table = row_table(task.decoder)
    table.maybe_trim()
    kept: list[tuple[int, int, bytes, str]] = []
    seen: set[bytes] = set()
    budget = task.max_bytes
    texts = table.texts

    def accept(start: int, row_ids: list[int]) -> bool:
        """Record one function; False once the budget is spent."""
        nonlocal budget
        if len(row_ids) < 2:
            result.n_short += 1
            return True
        digest = _digest(table.rows(row_ids))
        if digest in seen:
            return True
        seen.add(digest)
        text = "[" + ",".join([texts[i] for i in row_ids]) + "]"
        kept.append((start, len(row_ids), digest, text))
        budget -= len(text) + 1
        return budget > 0 and (task.max_functions is None or len(kept) < task.max_functions)

    data = image.data
    if task.decoder == "iced":
        for index in order:
            start, end = ranges[index]
            offset = image.offset_of(start, end - start)
            if offset is None:
                continue
            if not accept(start, iced.function_row_ids(bytes(data[offset : offset + end - start]), start, table)):
                break
    else:
        # objdump costs a process per call, so decode batches of functions laid
        # end to end in one blob.  15 bytes of nop (0x90) after each function make
        # a decode that runs past a function's end resynchronise before the next.
        # Batches start small (a budget is often met after a few dozen functions)
        # and grow for binaries that need more.
        batch_code_bytes = 64 << 10
        pad = b"\x90" * MAX_INSTRUCTION_BYTES
        position = 0
        done = False
        while position < len(order) and not done:
            blob = bytearray()
            bounds: list[tuple[int, int]] = []
            starts: list[int] = []
            while position < len(order) and len(blob) < batch_code_bytes:
                start, end = ranges[order[position]]
                position += 1
                offset = image.offset_of(start, end - start)
                if offset is None:
                    continue
                bounds.append((len(blob), len(blob) + end - start))
                starts.append(start)
                blob += data[offset : offset + end - start]
                blob += pad
            if not bounds:
                break
            batch_code_bytes = min(batch_code_bytes * 2, 1 << 20)
            for start, row_ids in zip(starts, objdump.function_row_ids(bytes(blob), 0, bounds, table), strict=True):
                if not accept(start, row_ids):
                    done = True
                    break
    image.close()
    kept.sort()
    result.functions = kept
    return result


def default_jobs() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def encode_binaries(tasks: Iterator[BinaryTask], jobs: int) -> Iterator[BinaryResult]:
    """Results in task order; workers run a bounded window ahead of the consumer."""
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        # Forked workers inherit the loaded package whatever the caller's sys.path
        # (spawned ones would have to import it again); without fork, stay in-process.
        for task in tasks:
            yield encode_binary(task)
        return
    pool = multiprocessing.get_context("fork").Pool(jobs)
    try:
        pending: collections.deque = collections.deque()
        window = 2 * jobs
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                else:
                    pending.append(pool.apply_async(encode_binary, (task,)))
            if not pending:
                return
            yield pending.popleft().get()
    finally:
        # The consumer stops early once the corpus is full; drop in-flight work.
        pool.terminate()
        pool.join()
