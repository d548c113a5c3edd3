"""`--fsdp`: parameters, gradients and optimizer state sharded over the ranks with FSDP2 (`fully_shard`), each
Transformer block one unit (its parameters gathered just before its forward and backward), then the root.

Checkpoints hold full, unsharded state dicts in the format of a 1-process or DDP run (parameter names, the
optimizer's state by parameter index), gathered by every rank and written by rank 0, so a checkpoint loads
at any world size, with or without --fsdp. Gathering needs the full model and optimizer state in rank 0's
memory once per save; torch's distributed checkpoint (one file per rank) avoids that, but would need
resharding to load in one process and another save format besides this one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["shard_model", "full_tensor", "local_tensor", "full_model_state", "full_optimizer_state",
           "load_full_model_state", "load_full_optimizer_state"]


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """Shard `model` (a CausalTransformer) in place over every rank of the process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one; every rank must call it in the same order)."""
    return t.full_tensor() if _is_dtensor(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `t` (`t` itself when not sharded)."""
    return t.to_local() if _is_dtensor(t) else t


def _like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`value` (a full tensor) sharded as `ref` is; every rank holds the whole value, so no communication."""
    if not _is_dtensor(ref) or not isinstance(value, torch.Tensor) or value.shape != ref.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: full_tensor(value).detach().cpu() for name, value in model.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    state = optimizer.state_dict()
    return {
        "state": {i: {k: full_tensor(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                  for i, s in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    model.load_state_dict({name: _like(value, own[name]) if name in own else value for name, value in state.items()})


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {
        i: {k: _like(v, params[int(i)]) if k != "step" else v for k, v in s.items()}
        for i, s in state["state"].items()
    }
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})
