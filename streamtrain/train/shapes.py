"""The batch shapes of the training plan: what `--compile` keeps a graph for, and what the `--amp` probe
times."""

from __future__ import annotations

import numpy as np

from streamtrain.data import bucketing

__all__ = ["plan_shapes", "plan_shape_tokens", "prepare_compile"]


def plan_shapes(stream, epoch: int = 0) -> set[tuple[int, int]]:
    """The distinct (B, T) batch shapes of `epoch`'s plan of a ShardStream (all ranks together)."""
    plan = stream.plan(epoch)
    sizes = np.diff(plan.starts)
    return set(zip(sizes.tolist(), np.asarray(plan.padded_len).tolist()))


def plan_shape_tokens(stream, epoch: int = 0) -> dict[tuple[int, int], int]:
    """Padded tokens per (B, T) batch shape over `epoch`'s plan of a ShardStream (all ranks together)."""
    plan = stream.plan(epoch)
    sizes = np.diff(plan.starts)[plan.batch_order]  # the epoch's batches
    lengths = np.asarray(plan.padded_len)[plan.batch_order]
    tokens: dict[tuple[int, int], int] = {}
    for B, T in zip(sizes.tolist(), lengths.tolist()):
        tokens[(B, T)] = tokens.get((B, T), 0) + B * T
    return tokens


def prepare_compile(stream, max_shapes: int) -> str:
    """Let torch.compile keep a graph for every padded length of the training plan; return the line that
    says so and what the fewer shapes cost in padding.

    The batch dimension is marked dynamic on every call, so only T selects a graph: one per T, plus one per
    T whose batches include B == 1 (torch specializes size-1 dimensions)."""
    import torch._dynamo

    shapes = plan_shapes(stream)
    lengths = {T for _, T in shapes}
    needed = 2 * len(lengths) + 8
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):  # torch renamed cache_size_limit to recompile_limit in 2.6
            setattr(config, name, max(getattr(config, name), needed))
    # the padding the loader's default shape count would leave, for comparison
    items = stream.items.lengths
    default_bounds = bucketing.bucket_bounds(items, stream.pad_multiple, bucketing.DEFAULT_MAX_SHAPES)
    default_plan = bucketing.plan_epoch(items, default_bounds, stream.max_tokens, 0, 0, shuffle=False)
    return (
        f"--compile: {len(shapes)} batch shapes (B, T) per epoch over {len(lengths)} padded lengths T "
        f"(--max-shapes {max_shapes}); B is dynamic, so about one compilation per T. Padding: "
        f"{100 * bucketing.pad_fraction(items, stream.plan(0)):.1f}% of batch tokens "
        f"({100 * bucketing.pad_fraction(items, default_plan):.1f}% with {len(default_bounds)} lengths uncompiled)"
    )
