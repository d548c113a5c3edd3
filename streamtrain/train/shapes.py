"""The batch shapes of the training plan: what `--compile` keeps a graph for, and what the `--amp` probe
times."""

from __future__ import annotations

from streamtrain.data import bucketing

__all__ = ["plan_shapes", "plan_shape_tokens", "prepare_compile"]


def plan_shapes(stream, epoch: int = 0) -> set[tuple[int, int]]:
    """The distinct (B, T) batch shapes of `epoch`'s plan of a ShardStream (all ranks together)."""
    return set(stream.plan(epoch).shapes())


def plan_shape_tokens(stream, epoch: int = 0) -> dict[tuple[int, int], int]:
    """Padded tokens per (B, T) batch shape over `epoch`'s plan of a ShardStream (all ranks together)."""
    return {(B, T): B * T * n for (B, T), n in stream.plan(epoch).shapes().items()}


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
    values, counts = stream.item_histogram()
    default_bounds = bucketing.bucket_bounds(values, stream.pad_multiple, bucketing.DEFAULT_MAX_SHAPES, counts=counts)
    return (
        f"--compile: {len(shapes)} batch shapes (B, T) per epoch over {len(lengths)} padded lengths T "
        f"(--max-shapes {max_shapes}); B is dynamic, so about one compilation per T. Padding: "
        f"{100 * stream.plan(0).pad_fraction:.1f}% of batch tokens "
        f"({100 * bucketing.rounding_pad_fraction(values, counts, default_bounds):.1f}% with {len(default_bounds)} "
        "lengths uncompiled)"
    )
