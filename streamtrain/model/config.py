"""ModelConfig: the shape of the causal Transformer (its fields are `streamtrain fit` flags)."""

from __future__ import annotations

from dataclasses import dataclass

from streamtrain.errors import UserError
from streamtrain.options import check_finite_floats, flag_name, option

__all__ = ["ModelConfig", "parse_groups"]


def parse_groups(specs: list[str] | None, dim: int | None = None) -> list[tuple[int, int]]:
    """--categorical START:END values -> sorted (start, end) field ranges, each of at least two fields, none
    overlapping another, and with `dim`, inside 0..dim."""
    groups = []
    for spec in specs or []:
        try:
            start, end = (int(v) for v in str(spec).split(":"))
        except ValueError:
            raise UserError(f"--categorical expects START:END (two integers), got {spec!r}") from None
        if not 0 <= start < end - 1:
            raise UserError(f"--categorical {spec}: needs 0 <= START and END >= START + 2 (a class group of two or more fields)")
        if dim is not None and end > dim:
            raise UserError(f"--categorical {spec}: outside the vectors' {dim} fields (END must be <= {dim})")
        groups.append((start, end))
    groups.sort()
    for (a0, a1), (b0, b1) in zip(groups, groups[1:]):
        if b0 < a1:
            raise UserError(f"--categorical {a0}:{a1} and {b0}:{b1} overlap: a field belongs to one group at most")
    return groups


@dataclass
class ModelConfig:
    dim: int = option(28, "width of each input vector, taken from the dataset", "floats", flag=False)
    d_model: int = option(128, "width of the Transformer residual stream", "channels")
    layers: int = option(4, "number of Transformer blocks", "blocks")
    heads: int = option(4, "attention heads per block; must divide --d-model", "heads")
    ff: int = option(512, "hidden width of each MLP", "channels")
    dropout: float = option(0.0, "dropout probability on embeddings, attention and MLP outputs", "probability")
    input_norm: bool = option(False, "apply a LayerNorm to the (standardized) input vectors before the embedding")
    categorical: list[str] | None = option(
        None,
        "fields START..END-1 one-hot encode a class: the model gives them as one softmax group trained with "
        "cross-entropy (the other fields: squared error); repeat for more groups",
        "START:END",
    )
    categorical_weight: float = option(1.0, "weight of each class group's cross-entropy against one field's squared error", "")

    def __post_init__(self) -> None:
        check_finite_floats(self)
        for name in ("dim", "d_model", "layers", "heads", "ff"):
            if getattr(self, name) < 1:
                raise UserError(f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise UserError(f"--d-model ({self.d_model}) must be divisible by --heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.categorical_weight < 0:
            raise UserError(f"--categorical-weight must be >= 0, got {self.categorical_weight}")
        parse_groups(self.categorical)  # the dataset's width is checked once it is known (`check_groups`)

    @property
    def categorical_groups(self) -> list[tuple[int, int]]:
        return parse_groups(self.categorical)

    def check_groups(self) -> None:
        """The --categorical groups fit the vectors (`dim`, known once the dataset is)."""
        parse_groups(self.categorical, self.dim)
