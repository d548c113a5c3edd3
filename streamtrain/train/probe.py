"""The `--amp` probe of a run on a CPU: rank 0 times this model's forward + backward in fp32 and bf16 at the
training plan's most frequent shapes (`precision.probe_cpu_precision`, cached per machine and config) and
every rank takes its answer. It runs the training step's own code on a copy of the model and on batches
of the plan read apart from the loader, and puts every global generator back as it found it, so the run
is the one `--precision` with the same answer gives.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from streamtrain.train.checkpoint import capture_rng_state, restore_rng_state
from streamtrain.train.distributed import DistInfo, all_gather_objects
from streamtrain.train.loss import valid_target_count
from streamtrain.train.precision import (
    CpuProbe,
    ProbeShape,
    autocast_for,
    probe_cpu_precision,
)
from streamtrain.train.shapes import plan_shape_tokens
from streamtrain.train.step import micro_batch_loss

__all__ = ["probe_run_precision"]


def probe_run_precision(model: torch.nn.Module, stream, standardize, device: torch.device, model_cfg,
                        dist: DistInfo) -> CpuProbe:
    probe = None
    if dist.is_main:
        rng = capture_rng_state()
        try:
            step = _probe_step(model, stream, standardize, device, model_cfg.dim)
            probe = probe_cpu_precision(step, plan_shape_tokens(stream), dataclasses.asdict(model_cfg))
        finally:
            restore_rng_state(rng)
    if dist.enabled:
        probe = all_gather_objects(dist, probe)[0]
    return probe


def _probe_step(model, stream, standardize, device, dim: int) -> Callable[[str, ProbeShape], None]:
    """The training step's forward, masked loss and backward on a real batch of the plan with the (B, T)
    shape asked for, in a precision, on a copy of the model: the real model's weights and gradients, the
    optimizer and the loader's position are never touched."""
    model = copy.deepcopy(model).train()
    plan = stream.plan(0)
    batches: dict[tuple[int, int], Any] = {}

    def run(precision: str, shape: ProbeShape) -> None:
        B, T = shape.batch, shape.length
        if (B, T) not in batches:
            batches[(B, T)] = stream.make_batch(plan.sample_rows(B, T))
        batch = batches[(B, T)]
        scale = 1.0 / max(valid_target_count(batch.lengths, dim), 1)
        loss = micro_batch_loss(model, batch, standardize, device, scale, lambda: autocast_for(precision, device.type), False)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run
