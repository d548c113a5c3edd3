"""The training objective: the masked next-step squared error, summed over valid targets.

Loss of one optimizer step over K micro-batches (and every rank under DDP):

    loss = sum over micro-batches, sequences b, positions t with t + 1 < length_b, dims d of
               (model(x_std)[b, t, d] - x_std[b, t + 1, d])^2
           / (number of such (t, d) entries in the whole step)

one mean over the step's valid targets, not a mean of per-batch means: a micro-batch of short sequences
weighs exactly its share of targets.
"""

from __future__ import annotations

import torch

__all__ = ["masked_sq_error", "valid_target_count"]


def masked_sq_error(pred: torch.Tensor, x_std: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of squared next-step errors over valid targets, in fp32.

    pred, x_std: (B, T, D); mask: (B, T) True on real vectors. Position t predicts x_std[t+1] and counts
    when t+1 is real (right padding: then t is real too)."""
    diff = pred[:, :-1].float() - x_std[:, 1:].float()  # (B, T-1, D)
    return diff.square().masked_fill(~mask[:, 1:, None], 0.0).sum()


def valid_target_count(lengths: torch.Tensor, dim: int) -> int:
    """Number of (position, dim) loss terms of a micro-batch: sum over sequences of (length - 1) * dim."""
    return int((lengths - 1).clamp(min=0).sum()) * dim
