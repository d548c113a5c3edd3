"""AdamW with decay only on matrices, and the warmup + cosine learning-rate schedule (a pure function of step)."""

from __future__ import annotations

import math

import torch

from streamtrain.train.config import OptimConfig

__all__ = ["build_optimizer", "default_warmup_steps", "lr_at", "set_lr"]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """Weight decay on 2-D weights only: decaying norm gains and biases (1-D) pulls them to 0 for no benefit."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one pass over each parameter (CUDA, and CPU since torch 2.4), a third of the foreach variant's
    # time on CPU for this model size; foreach where fused is unavailable.
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def default_warmup_steps(decay_steps: int) -> int:
    """The warmup when --warmup-steps is not given: a tenth of the schedule, at most 100 steps."""
    return min(100, decay_steps // 10)


def lr_at(step: int, cfg: OptimConfig, total_steps: int, warmup_steps: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to cfg.lr over `warmup_steps`
    (default cfg.warmup_steps), then cosine decay to cfg.lr * cfg.min_lr_fraction at `total_steps`."""
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps
    if warmup is None:
        warmup = default_warmup_steps(total_steps)
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    min_lr = cfg.lr * cfg.min_lr_fraction
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
