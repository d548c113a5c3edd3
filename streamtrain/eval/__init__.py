"""Using a trained model: evaluation against baselines, loading a checkpoint, predict, rollout, embed, export.

Importing this package imports no torch: the names below come from their modules on first use."""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]

_HOMES = {"load_model": "load"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"streamtrain.eval.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
