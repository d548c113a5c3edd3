"""Streaming batches: memory-mapped shard reader, token-budget bucketing plan, ShardStream and its loader.

`reader` and `bucketing` import numpy and pyarrow only, and importing them does not import torch: the
names below come from `stream` (which does) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ShardStream", "make_loader", "Batch", "Loader"]

if TYPE_CHECKING:
    from streamtrain.data.stream import Batch, Loader, ShardStream, make_loader


def __getattr__(name: str) -> Any:
    if name in __all__:
        from streamtrain.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
