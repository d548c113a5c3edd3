"""`Batch`, the padded batch every loader yields, and the model's view of one: standardized inputs and the
window offsets that place each row at its position in its sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

__all__ = ["Batch", "assemble_batch", "Standardizer", "standardization", "model_offsets"]


@dataclass
class Batch:
    """A padded batch. Rows are items: whole sequences, or windows of sequences longer than max_len."""

    x: torch.Tensor  # float32 (B, T, D), zero right-padding
    mask: torch.Tensor  # bool (B, T), True on real vectors
    lengths: torch.Tensor  # int64 (B,) real vectors per row
    ids: torch.Tensor  # int64 (B,) global sequence id (position in the dataset)
    offsets: torch.Tensor  # int64 (B,) first vector of the row within its sequence (0 unless windowed)

    @property
    def num_real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_padded_tokens(self) -> int:
        return self.x.shape[0] * self.x.shape[1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader's pin-memory thread."""
        return self._map(lambda t: t.pin_memory())


def assemble_batch(x: torch.Tensor, lengths: np.ndarray, ids: np.ndarray, offsets: np.ndarray) -> Batch:
    mask = np.arange(x.shape[1])[None, :] < lengths[:, None]
    return Batch(
        x=x,
        mask=torch.from_numpy(mask),
        lengths=torch.from_numpy(lengths),
        ids=torch.from_numpy(ids),
        offsets=torch.from_numpy(offsets),
    )



def standardization(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """float64 (mean, std) with zero-variance dimensions given std 1, so they pass through unscaled."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64).copy()
    std[~(std > 0)] = 1.0
    return mean, std


class Standardizer:
    """The model's view of a batch: (x - mean) / std in float32, zero on padding; one definition for
    training and evaluation. Keeps the float64 statistics (numpy and on `device`) for un-standardizing."""

    def __init__(self, mean, std, device: torch.device):
        self.mean, self.std = standardization(mean, std)  # float64 numpy
        self.mean64 = torch.as_tensor(self.mean, dtype=torch.float64, device=device)
        self.std64 = torch.as_tensor(self.std, dtype=torch.float64, device=device)
        self._mean32 = self.mean64.float()
        self._inv_std32 = (1.0 / self.std64).float()

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) original units, mask: (B, T) -> (B, T, D) standardized."""
        return ((x - self._mean32) * self._inv_std32).masked_fill(~mask[..., None], 0.0)


def model_offsets(batch, device: torch.device, always: bool = False) -> torch.Tensor | None:
    """The `offsets` argument of the model for `batch`: its window offsets on `device`, or None when every row
    starts its sequence (the model's cached positions; the check reads the CPU copy, no device sync).
    `always`: pass them even then (a compiled model keeps one graph instead of two)."""
    offsets = batch.offsets
    if not always and not bool(offsets.any()):
        return None
    return offsets.to(device, non_blocking=True)
