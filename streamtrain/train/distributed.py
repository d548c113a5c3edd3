"""Data-parallel plumbing: joining the torchrun process group, and the few collectives the Trainer needs
besides DDP's gradient all-reduce, each packed so that a step pays one blocking exchange.

Per optimizer step, `exchange_step_control` all-reduces one float64 vector

    [valid target count of this rank's micro-batches, stop requested, time is up]

The global target count must be known before any backward (it normalizes the loss); the two flags ride
along, so every rank agrees on the step to stop at without another collective. Without a process group
every function is the identity and touches no device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from streamtrain.errors import UserError

__all__ = [
    "DistInfo",
    "rank_seed",
    "StepControl",
    "setup_distributed",
    "exchange_step_control",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast_from_main",
    "all_gather_objects",
]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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


def setup_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) join the process group: nccl on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    device = torch.device(f"cuda:{info.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info, device


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
