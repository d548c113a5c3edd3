"""Data-parallel plumbing: joining the torchrun process group, and the few collectives the Trainer needs
besides DDP's gradient all-reduce, each packed so that a step pays one blocking exchange.

Per optimizer step, `exchange_step_control` all-reduces one float64 vector

    [valid target count of this rank's micro-batches, stop requested, time is up]

The global target count must be known before any backward (it normalizes the loss); the two flags ride
along, so every rank agrees on the step to stop at without another collective. Without a process group
every function is the identity and touches no device.

Rank death: every collective gives up after `--dist-timeout` (DEFAULT_DIST_TIMEOUT_S, instead of NCCL's 10
minutes), and a rank whose collective fails asks the heartbeats (`liveness`) which rank was lost, so that it
exits with one line naming it (`RankLost`, exit code EXIT_RANK_LOST) instead of a backend traceback.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from streamtrain.errors import UserError
from streamtrain.train.liveness import LOST_AFTER_S, Heartbeat, beat_count, lost_ranks, store_key

__all__ = [
    "DEFAULT_DIST_TIMEOUT_S",
    "EXIT_RANK_LOST",
    "RankLost",
    "DistInfo",
    "rank_seed",
    "StepControl",
    "setup_distributed",
    "exchange_step_control",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast_from_main",
    "all_gather_objects",
    "close_distributed",
    "rank_lost_error",
    "announce_main_ready",
    "wait_for_main",
]

# Longer than any wait of a healthy job (a checkpoint save or a compilation on one rank while the others wait
# in the next collective), far shorter than NCCL's 10 minutes of GPUs idling after a rank died.
DEFAULT_DIST_TIMEOUT_S = 120.0
EXIT_RANK_LOST = 4


class RankLost(UserError):
    """Another rank of the job stopped (killed, crashed, its node down): this one stops too."""

    exit_code = EXIT_RANK_LOST


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    store: Any = field(default=None, repr=False, compare=False)  # the rendezvous store (None: no group)
    heartbeat: Heartbeat | None = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class StepControl:
    """What every rank agrees on for one optimizer step."""

    target_count: int  # valid (position, dim) loss terms of the step, over all ranks
    stop: bool  # some rank caught SIGINT/SIGTERM
    time_up: bool  # some rank's clock passed --max-seconds


def setup_distributed(device_pref: str, timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> tuple[DistInfo, torch.device]:
    """Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set) join the process group: nccl on
    CUDA, gloo on CPU, every collective bounded by `timeout_s`; start this rank's heartbeat."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    device = torch.device(f"cuda:{info.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        # What init_process_group(init_method="env://") does, keeping the store for the heartbeats, with keys
        # of this attempt only: torchrun's agent keeps its store across restarts, and a restarted rank that
        # read the previous attempt's addresses would wait for ranks that no longer listen there.
        store, _, _ = next(dist.rendezvous("env://", rank=info.rank, world_size=world_size, timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                store=dist.PrefixStore(store_key("default_pg"), store),
                                rank=info.rank, world_size=world_size, timeout=timeout)
        info.store = store
        info.heartbeat = Heartbeat(store, info.rank, os.environ.get("MASTER_ADDR"),
                                   int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else None,
                                   timeout_s).start()
    return info, device


def close_distributed(info: DistInfo, done: bool) -> None:
    """Leave the process group; `done`: this rank finished normally (its silence is not a loss)."""
    if info.heartbeat is not None:
        info.heartbeat.stop(done)
        info.heartbeat = None
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank_lost_error(info: DistInfo, during: str) -> RankLost | None:
    """After a failed collective: the RankLost naming the ranks whose heartbeat stopped, or None when every
    rank is alive (the failure is this rank's own). Takes LOST_AFTER_S. torchrun sends the survivors SIGTERM
    as soon as a worker dies; the run is ending anyway, so it is ignored for the look-up and the line."""
    if not info.enabled or info.store is None:
        return None
    previous = _ignore_stop_signals()
    lost = lost_ranks(info.store, info.world_size, info.rank)
    if lost is None:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            return RankLost(f"the rendezvous store at {where} (torchrun's agent) cannot be reached {during}: its "
                            f"node is down; rank {info.rank} stops too")
        lost = [0]  # rank 0 hosts the store when torchrun's agent does not
    if not lost:
        _restore_signals(previous)
        return None
    names = ("ranks " if len(lost) > 1 else "rank ") + ", ".join(map(str, lost))
    return RankLost(
        f"{names} of {info.world_size} lost {during} (no heartbeat for {LOST_AFTER_S:g} s: killed, crashed or "
        f"its node is down); rank {info.rank} stops too. Continue with --resume, or run under "
        "torchrun --max-restarts K, which restarts and resumes from checkpoints/last.pt"
    )


def _ignore_stop_signals() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def announce_main_ready(info: DistInfo, name: str, ok: bool) -> None:
    """Rank 0 tells the ranks waiting in `wait_for_main(name)` that it is done (or failed: `ok` False)."""
    if info.enabled and info.store is not None:
        info.store.set(store_key(f"ready/{name}"), "ok" if ok else "failed")


def wait_for_main(info: DistInfo, name: str, what: str) -> None:
    """Wait, however long, for rank 0's `announce_main_ready(name)` (`what` it is doing, for messages):
    not a collective, whose timeout would cut short a long conversion; rank 0's heartbeat bounds the wait
    instead."""
    if not info.enabled or info.store is None:
        return
    key = store_key(f"ready/{name}")
    while not info.store.check([key]):
        beats = beat_count(info.store, 0)
        deadline = time.monotonic() + LOST_AFTER_S
        while not info.store.check([key]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not info.store.check([key]) and beat_count(info.store, 0) == beats:
            raise RankLost(f"rank 0 of {info.world_size} lost while {what} (no heartbeat for {LOST_AFTER_S:g} s); "
                           f"rank {info.rank} stops too")
    if info.store.get(key) != b"ok":
        raise UserError(f"rank 0 failed while {what} (its error is above); rank {info.rank} stops too")


def exchange_step_control(
    info: DistInfo, device: torch.device, target_count: int, stop: bool, time_up: bool
) -> StepControl:
    """Sum the target counts and OR the flags over ranks, in one all-reduce and one host sync."""
    if not info.enabled:
        return StepControl(target_count, stop, time_up)
    # float64 holds counts exactly up to 2**53
    packed = torch.tensor([float(target_count), float(stop), float(time_up)], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    count, stops, time_ups = packed.tolist()
    return StepControl(int(count), stops > 0, time_ups > 0)


def all_reduce_sum(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a new tensor; `values` itself is left alone)."""
    out = values.clone()
    if info.enabled:
        dist.all_reduce(out)
    return out


def all_reduce_max(info: DistInfo, device: torch.device, value: float) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_from_main(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Rank 0's `values` on every rank (in place; the same shape and dtype must be passed everywhere)."""
    if info.enabled:
        dist.broadcast(values, src=0)
    return values


def all_gather_objects(info: DistInfo, obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank (a list of one alone)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """Seed of rank `rank`'s per-sample randomness (dropout): a pure function of (--seed, rank, ...), distinct
    for every rank and from the stream --seed itself starts (which initialised the model)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, *more]).generate_state(1, np.uint64)[0])
