"""streamtrain: train causal Transformers on sequences of fixed-width float vectors, as fast as the hardware allows.

The package root stays light: `import streamtrain` imports neither torch nor pyarrow; `streamtrain.load_model`
imports them on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["load_model", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from streamtrain.eval.load import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
