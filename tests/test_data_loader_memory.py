"""Soak: over more than 10,000 batches the loader's resident memory stays flat, in the main process and in
each worker. VmRSS is sampled during the run and a line fitted after a warm-up; a leak of a KB per batch,
or a consumer keeping every batch, gives a slope far above the bound (the second test shows it does)."""

import ctypes
import gc
import os

import numpy as np
import pytest
from conftest import write_dataset

from streamtrain.data import ShardStream, make_loader
from streamtrain.data import stream as stream_module

NUM_BATCHES = 10_400  # 14 epochs of the data below, so epoch starts of the persistent workers are in it
WARMUP_BATCHES = 2_000  # a few epochs: every shard page touched, the ring's slots and the allocator's pools in use
SAMPLE_EVERY = 200
FLAT_KB_PER_BATCH = 0.1  # about 10x the slope measured without a leak; a 1 KB leak per batch is ~5x above it


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def _release_free_memory() -> None:
    """Hand freed heap back to the OS: memory that is free but still resident (in this process, and in the
    workers, which fork from it) would take a leak's first megabytes without RSS moving."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    rng = np.random.default_rng(0)
    seqs = [rng.standard_normal((int(rng.integers(2, 16)), 4)).astype(np.float32) for _ in range(2000)]
    root = tmp_path_factory.mktemp("soak") / "ds"
    write_dataset(root, seqs, shard_bytes=20_000)
    return root


def _rss_slopes(root, keep_batches: bool = False) -> dict[str, float]:
    """Iterate NUM_BATCHES small batches with 2 workers; KB of VmRSS per batch after the warm-up, per process."""
    _release_free_memory()
    loader = make_loader(ShardStream(root, max_tokens=32, seed=0), num_workers=2)
    kept, samples, pids = [], [], None
    done = 0
    while done < NUM_BATCHES:
        for batch in loader:
            done += 1
            if keep_batches:
                kept.append(batch)
            if done % SAMPLE_EVERY == 0:
                workers = [w.pid for w in loader._dataloader._iterator._workers]
                pids = pids or workers
                assert workers == pids  # the same persistent workers throughout
                samples.append([done, _rss_kb(os.getpid()), *(_rss_kb(pid) for pid in workers)])
    a = np.array(samples, dtype=np.float64)
    after = a[:, 0] > WARMUP_BATCHES
    names = ["main"] + [f"worker {k}" for k in range(len(pids))]
    return {name: float(np.polyfit(a[after, 0], a[after, k + 1], 1)[0]) for k, name in enumerate(names)}


def test_resident_memory_stays_flat_over_ten_thousand_batches(root):
    slopes = _rss_slopes(root)
    assert len(slopes) == 3
    assert all(slope < FLAT_KB_PER_BATCH for slope in slopes.values()), slopes


@pytest.mark.slow
@pytest.mark.parametrize("leak", ["main process keeps every batch", "each worker leaks 1 KB per batch"])
def test_the_soak_catches_an_injected_leak(root, leak, monkeypatch):
    if leak.startswith("each worker"):
        leaked = []
        slot_batch = stream_module.ShardStream._slot_batch

        def leaky(self, *args, **kwargs):
            leaked.append(bytearray(1024))
            return slot_batch(self, *args, **kwargs)

        monkeypatch.setattr(stream_module.ShardStream, "_slot_batch", leaky)  # the workers fork with it
        leaking = ["worker 0", "worker 1"]
    else:
        leaking = ["main"]
    slopes = _rss_slopes(root, keep_batches=leak.startswith("main"))
    assert all(slopes[name] > FLAT_KB_PER_BATCH for name in leaking), slopes
    assert all(slopes[name] < FLAT_KB_PER_BATCH for name in set(slopes) - set(leaking)), slopes
