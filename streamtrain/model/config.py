"""ModelConfig: the shape of the causal Transformer (its fields are `streamtrain fit` flags)."""

from __future__ import annotations

from dataclasses import dataclass

from streamtrain.errors import UserError
from streamtrain.options import check_finite_floats, flag_name, option

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    dim: int = option(28, "width of each input vector, taken from the dataset", "floats", flag=False)
    d_model: int = option(128, "width of the Transformer residual stream", "channels")
    layers: int = option(4, "number of Transformer blocks", "blocks")
    heads: int = option(4, "attention heads per block; must divide --d-model", "heads")
    ff: int = option(512, "hidden width of each MLP", "channels")
    dropout: float = option(0.0, "dropout probability on embeddings, attention and MLP outputs", "probability")
    input_norm: bool = option(False, "apply a LayerNorm to the (standardized) input vectors before the embedding")

    def __post_init__(self) -> None:
        check_finite_floats(self)
        for name in ("dim", "d_model", "layers", "heads", "ff"):
            if getattr(self, name) < 1:
                raise UserError(f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise UserError(f"--d-model ({self.d_model}) must be divisible by --heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
