"""One optimizer step: forward and masked loss of each micro-batch under autocast, backward through the
GradScaler (DDP syncs gradients on the last micro-batch only), unscale, clip, the learning rate, AdamW.

The step loss is normalized by the step's count of valid targets over every rank (`loss`), which is known
before any backward because the K micro-batches are fetched first and the count is exchanged with the
step's control flags (`distributed.exchange_step_control`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from streamtrain.data.batch import Standardizer, model_offsets
from streamtrain.train.checkpoint import unwrap_model
from streamtrain.train.distributed import DistInfo, all_reduce_sum
from streamtrain.train.loss import masked_sq_error, next_step_loss
from streamtrain.train.optim import set_lr
from streamtrain.train.sharding import full_tensor

__all__ = ["StepOutcome", "StepRunner", "micro_batch_loss"]


def micro_batch_loss(model, batch, standardize: Standardizer, device: torch.device, scale: float, autocast,
                     compiled: bool) -> torch.Tensor:
    """Forward of one micro-batch under `autocast()` and its masked loss times `scale`, in fp32."""
    x = batch.x.to(device, non_blocking=True)
    mask = batch.mask.to(device, non_blocking=True)
    x_std = standardize(x, mask)
    # compiled: always pass offsets, one graph per T instead of two
    offsets = model_offsets(batch, device, always=compiled)
    if compiled:
        torch._dynamo.maybe_mark_dynamic(x_std, 0)  # B: only T selects a graph
        torch._dynamo.maybe_mark_dynamic(offsets, 0)
    with autocast():
        pred = model(x_std, offsets)
    cfg = unwrap_model(model).cfg
    groups = cfg.categorical_groups
    if not groups:
        return masked_sq_error(pred, x_std, mask) * scale
    return next_step_loss(pred, x_std, mask, x, groups, cfg.categorical_weight) * scale


@dataclass
class StepOutcome:
    loss: torch.Tensor  # this rank's share of the step loss (detached); the shares of all ranks sum to it
    grad_norm: torch.Tensor  # the global gradient norm before clipping
    finite: bool | None  # None unless non-finite steps are skipped; False: this step's update was dropped


class StepRunner:
    """Runs optimizer steps of `model` (`train_model`: the same module, compiled and/or DDP-wrapped)."""

    def __init__(self, model, train_model, optimizer, precision, standardize: Standardizer, dist: DistInfo,
                 device: torch.device, clip: float, compiled: bool, skip_nonfinite: bool, sharded: bool = False):
        self.model, self.train_model, self.optimizer, self.precision = model, train_model, optimizer, precision
        self.standardize, self.dist, self.device = standardize, dist, device
        self.clip = clip if clip > 0 else float("inf")
        self.compiled, self.skip_nonfinite, self.sharded = compiled, skip_nonfinite, sharded

    def accumulate_gradients(self, group: list, target_count: int) -> torch.Tensor:
        """Forward + backward of every micro-batch of `group`, normalized by the step's `target_count` over
        all ranks; returns this rank's share of the step loss (detached)."""
        # DDP averages gradients over ranks; multiplying by world_size turns that average into the global sum.
        scale = self.dist.world_size / max(target_count, 1)
        loss_total = torch.zeros((), device=self.device)
        for i, batch in enumerate(group):
            last = i == len(group) - 1
            sync = contextlib.nullcontext()
            if self.sharded:  # FSDP2 reduce-scatters the gradients of the last micro-batch only
                self.train_model.set_requires_gradient_sync(last)
            elif self.dist.enabled and not last:
                sync = self.train_model.no_sync()
            with sync:
                loss = micro_batch_loss(self.train_model, batch, self.standardize, self.device, scale,
                                        self.precision.autocast, self.compiled)
                self.precision.scaler.scale(loss).backward()
            loss_total += loss.detach()
        return loss_total / self.dist.world_size

    def run(self, group: list, target_count: int, lr: float) -> StepOutcome:
        """One optimizer step over `group` at learning rate `lr` (no host sync beyond what DDP needs). With
        skip_nonfinite, a step with a NaN/Inf loss (or gradient norm, unless a GradScaler handles
        overflowing gradients itself) drops its update and reports finite=False."""
        loss = self.accumulate_gradients(group, target_count)
        scaler = self.precision.scaler
        scaler.unscale_(self.optimizer)
        # under --fsdp the norm of sharded gradients is itself sharded: the whole is one all-reduce
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True))
        finite = None
        if self.skip_nonfinite:
            finite = self._is_finite(loss, grad_norm, scaler.is_enabled())
            if not finite:
                scaler.update()  # after unscale_ it saw the NaN/Inf gradients: an fp16 scale backs off
                self.optimizer.zero_grad(set_to_none=True)
                return StepOutcome(loss, grad_norm, False)
        set_lr(self.optimizer, lr)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss, grad_norm, finite)

    def _is_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, scaled: bool) -> bool:
        """Whether the step's loss (summed over ranks, so that every rank decides alike) and, without a
        GradScaler, its gradient norm (the same on every rank after DDP's all-reduce) are finite. One host
        sync per step, and under DDP one all-reduce: the price of --nonfinite skip."""
        step_loss = all_reduce_sum(self.dist, loss.reshape(1).to(torch.float64))
        checks = step_loss if scaled else torch.cat([step_loss, grad_norm.reshape(1).to(torch.float64)])
        return bool(torch.isfinite(checks).all())
