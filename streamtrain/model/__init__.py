"""The causal Transformer that predicts the next vector, its config and its FLOPs per token.

`ModelConfig` imports no torch (the command line builds its flags from it); the model itself comes from
`transformer` on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamtrain.model.config import ModelConfig

__all__ = ["ModelConfig", "CausalTransformer", "sinusoidal_positions"]

if TYPE_CHECKING:
    from streamtrain.model.transformer import CausalTransformer, sinusoidal_positions


def __getattr__(name: str) -> Any:
    if name in ("CausalTransformer", "sinusoidal_positions"):
        from streamtrain.model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
