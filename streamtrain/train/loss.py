"""The training objective: the masked next-step error, summed over valid targets.

Loss of one optimizer step over K micro-batches (and every rank under DDP):

    loss = sum over micro-batches, sequences b, positions t with t + 1 < length_b, of
               sum over number fields d of (model(x_std)[b, t, d] - x_std[b, t + 1, d])^2
             + W * sum over class groups g of cross_entropy(model(x_std)[b, t, g], class of x[b, t + 1, g])
           / (number of such (t, term) entries in the whole step)

where a term is a number field or a class group (`--categorical START:END`: those fields one-hot encode a
class, the class of a target is the argmax of its original fields, the model's outputs over them are logits)
and W is --categorical-weight. Without groups this is the mean squared error over every (t, d). One mean
over the step's valid targets, not a mean of per-batch means: a micro-batch of short sequences weighs
exactly its share of targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_sq_error", "next_step_loss", "valid_target_count", "loss_terms"]


def masked_sq_error(pred: torch.Tensor, x_std: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of squared next-step errors over valid targets, in fp32.

    pred, x_std: (B, T, D); mask: (B, T) True on real vectors. Position t predicts x_std[t+1] and counts
    when t+1 is real (right padding: then t is real too)."""
    diff = pred[:, :-1].float() - x_std[:, 1:].float()  # (B, T-1, D)
    return diff.square().masked_fill(~mask[:, 1:, None], 0.0).sum()


def next_step_loss(pred: torch.Tensor, x_std: torch.Tensor, mask: torch.Tensor, x: torch.Tensor | None = None,
                   groups: list[tuple[int, int]] = (), weight: float = 1.0) -> torch.Tensor:
    """The step loss's numerator for one micro-batch, in fp32: squared errors of the number fields plus
    `weight` times the cross-entropy of each class group in `groups`, over valid targets.

    x: (B, T, D) the original vectors, whose argmax over a group is the class (needed with groups)."""
    if not groups:
        return masked_sq_error(pred, x_std, mask)
    D = pred.shape[-1]
    number = torch.ones(D, dtype=torch.bool, device=pred.device)
    for a, b in groups:
        number[a:b] = False
    valid = mask[:, 1:]  # (B, T-1)
    diff = (pred[:, :-1].float() - x_std[:, 1:].float())[..., number]  # (B, T-1, numbers)
    total = diff.square().masked_fill(~valid[..., None], 0.0).sum()
    for a, b in groups:
        logits = pred[:, :-1, a:b].float()  # (B, T-1, classes)
        target = x[:, 1:, a:b].argmax(dim=-1)  # (B, T-1)
        ce = F.cross_entropy(logits.reshape(-1, b - a), target.reshape(-1), reduction="none").view_as(target)
        total = total + weight * ce.masked_fill(~valid, 0.0).sum()
    return total


def loss_terms(dim: int, groups: list[tuple[int, int]] = ()) -> int:
    """Loss terms per target: each number field, and each class group once."""
    return dim - sum(b - a for a, b in groups) + len(groups)


def valid_target_count(lengths: torch.Tensor, dim: int) -> int:
    """Number of (position, term) loss terms of a micro-batch: sum over sequences of (length - 1) * dim, where
    `dim` is the terms per target (`loss_terms`; the vector width without class groups)."""
    return int((lengths - 1).clamp(min=0).sum()) * dim
