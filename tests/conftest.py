import random

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def checksum_cache(tmp_path_factory, monkeypatch):
    """Verification records of every test in a folder of its own (never the home folder), and nothing
    remembered in this process from an earlier test. Returns the folder."""
    from streamtrain.dataset import checksums

    folder = tmp_path_factory.mktemp("checksum-cache")
    monkeypatch.setenv("STREAMTRAIN_CACHE_DIR", str(folder))
    checksums.forget()
    yield folder
    checksums.forget()


@pytest.fixture
def deterministic_rng():
    """Seed python, numpy and (when loaded) torch for one test, and restore their states after."""
    import sys

    py_state = random.getstate()
    np_state = np.random.get_state()
    torch = sys.modules.get("torch")
    torch_state = torch.random.get_rng_state() if torch is not None else None
    random.seed(0)
    np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)
    yield np.random.default_rng(0)
    random.setstate(py_state)
    np.random.set_state(np_state)
    if torch is not None:
        torch.random.set_rng_state(torch_state)


def write_dataset(root, sequences, dim=None, shard_bytes=64 << 20):
    """Write `sequences` (list of (T, D) arrays) as a dataset in `root` and return its Index."""
    from streamtrain.dataset import DatasetWriter

    dim = dim or sequences[0].shape[1]
    with DatasetWriter(root, dim=dim, shard_bytes=shard_bytes) as w:
        for i, s in enumerate(sequences):
            w.add(s, path="mem.jsonl", line=i + 1)
    from streamtrain.dataset import read_index

    return read_index(root)
