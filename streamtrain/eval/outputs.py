"""What a model's outputs mean: standardized predictions of the number fields and, for each class group
(`--categorical`), logits. In original units a group is its softmax probabilities (so the squared error of a
group is the Brier score); fed back into a rollout, it is the one-hot vector of its most likely class, as the
model saw its inputs in training."""

from __future__ import annotations

import torch

from streamtrain.data.batch import Standardizer

__all__ = ["ModelOutputs"]


class ModelOutputs:
    def __init__(self, standardizer: Standardizer, groups: list[tuple[int, int]] = ()):
        self.standardizer = standardizer
        self.groups = list(groups)

    def original(self, pred: torch.Tensor) -> torch.Tensor:
        """(..., D) model outputs -> float64 predictions in original units."""
        out = pred.double() * self.standardizer.std64 + self.standardizer.mean64
        for a, b in self.groups:
            out[..., a:b] = torch.softmax(pred[..., a:b].double(), dim=-1)
        return out

    def standardized(self, pred: torch.Tensor) -> torch.Tensor:
        """The predictions in standardized units, float64 (the outputs themselves, but for class groups)."""
        if not self.groups:
            return pred.double()
        return (self.original(pred) - self.standardizer.mean64) / self.standardizer.std64

    def feedback(self, pred: torch.Tensor) -> torch.Tensor:
        """The next input of a rollout: the prediction, with each class group as the one-hot of its argmax,
        standardized; in pred's dtype."""
        if not self.groups:
            return pred
        x = self.original(pred)
        for a, b in self.groups:
            x[..., a:b] = torch.nn.functional.one_hot(pred[..., a:b].argmax(-1), b - a).double()
        return ((x - self.standardizer.mean64) / self.standardizer.std64).to(pred.dtype)
