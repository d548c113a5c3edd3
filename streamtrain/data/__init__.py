"""Streaming batches: the memory-mapped shard reader, bucketing and the epoch plan (pure numpy), ShardStream,
its Loader, the shared-memory hand-over from workers, and Batch.

`reader`, `bucketing` and `plan` import numpy and pyarrow only, and importing this package does not import
torch: the names below are imported from their modules on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ShardStream", "make_loader", "Batch", "Loader"]

if TYPE_CHECKING:
    from streamtrain.data.batch import Batch
    from streamtrain.data.loader import Loader, make_loader
    from streamtrain.data.stream import ShardStream

_HOMES = {"ShardStream": "stream", "Batch": "batch", "Loader": "loader", "make_loader": "loader"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"streamtrain.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
