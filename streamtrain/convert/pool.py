"""The worker processes of a convert run: a small process pool that knows which task each worker holds, so a
worker that dies (the OOM killer, kill -9) ends the run at once with the task it lost, where
`multiprocessing.Pool` would wait for its result forever.

Every worker is forked when the pool is created, so the caller can create the pool before it starts any
thread (a process forked while another thread runs can deadlock on a lock that thread held). Each worker
has a pipe of its own: the parent sends it one task, the worker answers with the result or the exception,
and only then gets the next task. The parent waits on the pipes and on the workers' process sentinels
together, so it sees a death as soon as it happens. On Linux a worker is also killed when the parent dies,
so no orphan keeps writing into the dataset folder (or keeps its lock).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Callable, Hashable, Iterator

__all__ = ["WorkerLost", "RemoteTraceback", "ProcessPool"]


class WorkerLost(Exception):
    """A worker process ended while it held a task (`tag`; None when it held none)."""

    def __init__(self, tag: Hashable | None, pid: int, exitcode: int | None) -> None:
        self.tag, self.pid, self.exitcode = tag, pid, exitcode
        super().__init__(f"worker process {pid} {self.how}")

    @property
    def how(self) -> str:
        """How the worker ended: "was killed by signal 9 (SIGKILL)" or "exited with code 3"."""
        if self.exitcode is not None and self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = "unknown signal"
            return f"was killed by signal {-self.exitcode} ({name})"
        return f"exited with code {self.exitcode}"


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (attached as the `__cause__` of the re-raised one)."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def _die_with_parent(parent_pid: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the call
        os._exit(1)


def _worker_main(conn, inherited_fds: list[int], initializer: Callable[[], None] | None, parent_pid: int) -> None:
    for fd in inherited_fds:  # the parent's ends of every pipe: a worker must see EOF when the parent goes
        os.close(fd)
    _die_with_parent(parent_pid)
    if initializer is not None:
        initializer()
    while True:
        try:
            fn, arg = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        try:
            reply = ("ok", fn(arg))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent, which decides
            reply = ("error", e, traceback.format_exc())
        try:
            conn.send(reply)
        except (EOFError, OSError, KeyboardInterrupt):
            return
        except Exception:  # an exception that does not pickle: send its text instead
            conn.send(("error", RuntimeError(repr(reply[1])), reply[2] if len(reply) > 2 else ""))


class ProcessPool:
    """`processes` worker processes, all started here (forked on Linux). Use as a context manager; leaving it
    stops every worker (killing those still busy) and waits for them, so none writes anything afterwards."""

    def __init__(self, processes: int, initializer: Callable[[], None] | None = None) -> None:
        fork = sys.platform.startswith("linux")
        ctx = multiprocessing.get_context("fork" if fork else "spawn")
        self._procs: list = []
        self._conns: list = []
        self._busy: dict[int, Hashable] = {}  # worker index -> tag of the task it holds
        self._pending: deque = deque()  # (fn, arg, tag) not yet sent
        try:
            for _ in range(processes):
                parent_end, child_end = ctx.Pipe()
                self._conns.append(parent_end)
                inherited = [c.fileno() for c in self._conns] if fork else []
                proc = ctx.Process(target=_worker_main, args=(child_end, inherited, initializer, os.getpid()),
                                   daemon=True)
                proc.start()
                child_end.close()
                self._procs.append(proc)
        except BaseException:
            self.close(kill=True)
            raise

    def __enter__(self) -> "ProcessPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(kill=exc_type is not None or bool(self._busy))

    def submit(self, fn: Callable[[Any], Any], arg: Any, tag: Hashable) -> None:
        """Run `fn(arg)` on the next idle worker; its result comes back from `results()` under `tag`."""
        self._pending.append((fn, arg, tag))
        self._dispatch()

    def _dispatch(self) -> None:
        for i, conn in enumerate(self._conns):
            if not self._pending:
                return
            if i not in self._busy and self._procs[i].is_alive():
                fn, arg, tag = self._pending.popleft()
                self._busy[i] = tag
                try:
                    conn.send((fn, arg))
                except OSError:
                    pass  # it died just now: its sentinel reports it, with this task

    def results(self) -> Iterator[tuple[Hashable, Any]]:
        """(tag, result) of each submitted task as it finishes, until none is left (tasks submitted meanwhile
        included). Re-raises a task's exception; WorkerLost when a worker dies."""
        while self._busy or self._pending:
            self._dispatch()
            sentinels = {self._procs[i].sentinel: i for i in range(len(self._procs))}
            ready = wait([self._conns[i] for i in self._busy] + list(sentinels))
            for obj in ready:
                if obj in sentinels:
                    i = sentinels[obj]
                    if i in self._busy and self._conns[i].poll():
                        continue  # it answered before it ended: read the answer first
                    proc = self._procs[i]
                    proc.join()
                    raise WorkerLost(self._busy.get(i), proc.pid, proc.exitcode)
            for obj in ready:
                if obj in sentinels:
                    continue
                i = self._conns.index(obj)
                try:
                    reply = obj.recv()
                except (EOFError, OSError):
                    proc = self._procs[i]
                    proc.join()
                    raise WorkerLost(self._busy.get(i), proc.pid, proc.exitcode) from None
                tag = self._busy.pop(i)
                self._dispatch()
                if reply[0] == "error":
                    raise reply[1] from RemoteTraceback(reply[2])
                yield tag, reply[1]

    def close(self, kill: bool = False) -> None:
        """Stop every worker and wait for it; `kill` ends busy ones at once (their task is abandoned)."""
        for conn in self._conns:
            conn.close()  # an idle worker sees EOF and exits
        for proc in self._procs:
            if kill and proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():  # stuck: it cannot be allowed to write after the run
                proc.kill()
                proc.join()
        self._conns, self._procs, self._busy = [], [], {}
        self._pending.clear()
