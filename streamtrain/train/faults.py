"""A test hook that kills one rank mid-run, as `kill -9` or the out-of-memory killer would, so that tests can
exercise rank death: STREAMTRAIN_TEST_KILL_RANK=R STREAMTRAIN_TEST_KILL_AT_STEP=N makes rank R SIGKILL itself
once step N is done, in the first attempt of a job only (TORCHELASTIC_RESTART_COUNT unset or 0), so that a
restarted job runs through."""

from __future__ import annotations

import os
import signal

__all__ = ["kill_rank_if_asked"]


def kill_rank_if_asked(step: int, rank: int) -> None:
    at = os.environ.get("STREAMTRAIN_TEST_KILL_AT_STEP")
    if at is None or int(at) != step or int(os.environ.get("STREAMTRAIN_TEST_KILL_RANK", "1")) != rank:
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    os.kill(os.getpid(), signal.SIGKILL)
