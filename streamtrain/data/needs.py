"""What the caches of a stream's remote sources are told, from the epoch plan: how much a rank reads at once
(checked against each cache's limit at start), which shards a rank reads from a batch on, in the order first
needed, and, as a process moves from window to window, what it reads now and later (`ShardCache.publish`).
Local sources have no cache and are left out.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from streamtrain.data.plan import EpochPlan
from streamtrain.data.reader import ShardReader
from streamtrain.data.sources import SourceSet
from streamtrain.errors import UserError
from streamtrain.storage.cache import ShardCache

__all__ = ["check_cache_limits", "shards_needed", "publish_needs"]


def check_cache_limits(caches: list[ShardCache | None], sources: SourceSet, plan_of: Callable[[int], EpochPlan],
                       span: int, window: int | None) -> None:
    """A cache must hold what a rank reads at once (a batch reads `span` consecutive windows): a smaller
    limit is an error now, not a wait later. Sets each limited cache's `working_bytes` to that amount.
    `plan_of(0)` is asked for only when some cache has a limit."""
    limited = [s for s, c in enumerate(caches) if c is not None and c.limit_bytes is not None]
    if not limited:
        return
    plan = plan_of(0)
    need = dict.fromkeys(limited, 0)
    for j in range(plan.num_windows):
        at_once: dict[int, int] = {}
        for shard in set(plan.window_tags(j)):  # window j's shards and those its carried items come from
            s, ix, k = sources.shard_info(shard)
            if s in need:
                at_once[s] = at_once.get(s, 0) + ix.shards[k].bytes
        for s, b in at_once.items():
            need[s] = max(need[s], b)
    for s, b in need.items():
        cache = caches[s]
        cache.working_bytes = b
        if cache.limit_bytes < b:
            raise UserError(
                f"--cache-limit {cache.limit_bytes} bytes is smaller than the {b} bytes of shards of {cache.where} "
                f"a rank reads at once ({span} windows of {window or 'all'} shards); raise it or lower the window"
            )


def shards_needed(plan: EpochPlan, mine: np.ndarray, start: int = 0) -> list[tuple[int, int]]:
    """The shards a rank whose batches are `mine` (epoch batch numbers, in order) reads from its batch `start`
    on, in the order first needed: [(global shard number, the rank-local batch from which it is needed)]."""
    starts = plan.window_starts()
    seen: dict[int, int] = {}
    done_windows = set()
    for k in range(start, len(mine)):
        j = int(np.searchsorted(starts, mine[k], side="right") - 1)
        if j in done_windows:
            continue
        done_windows.add(j)
        for shard in plan.window_tags(j):
            seen.setdefault(shard, k)
    return sorted(seen.items(), key=lambda kv: kv[1])


def publish_needs(caches: list[ShardCache | None], readers: list[ShardReader | None], sources: SourceSet, epoch: int,
                  plan: EpochPlan, window: int | None, order: list[int]) -> None:
    """Tell each source's cache what this process reads now (window `window`'s shards, and those of the
    earlier windows its carried items come from; None: nothing) and needs later this epoch (`order`, global
    shard numbers). This process's reader of that source first unmaps every other shard: a map of a shard
    it no longer reads would keep the file's disk space after the cache evicts it, past the limit."""
    hard = set(plan.window_tags(window)) if window is not None else set()
    names_later: dict[int, list[str]] = {s: [] for s, c in enumerate(caches) if c is not None}
    names_now: dict[int, set[str]] = {s: set() for s in names_later}
    open_now: dict[int, set[int]] = {s: set() for s in names_later}
    for shard in order:
        s, ix, k = sources.shard_info(shard)
        if s in names_later:
            names_later[s].append(ix.shards[k].file)
    for shard in hard:
        s, ix, k = sources.shard_info(shard)
        if s in names_now:
            names_now[s].add(ix.shards[k].file)
            open_now[s].add(k)
    for s in names_later:
        if readers[s] is not None:
            readers[s].retain(open_now[s])
        caches[s].publish(epoch, names_later[s], names_now[s])
