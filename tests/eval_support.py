"""One tiny model trained for a few steps on synthetic data, shared by the tests of what uses a trained model
(trained once per test session), and a dataset of sequences of varied lengths to run it on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import write_dataset

DIM = 6
TINY = {"d_model": 16, "layers": 2, "heads": 2, "ff": 32, "num_workers": 0, "quiet": True, "log_every": 5,
        "batch_tokens": 128, "max_len": 16, "max_steps": 12, "seed": 0}

_trained: dict[str, Path] = {}


def train_tiny(root: Path, name: str = "run", classed: bool = False, **flags) -> Path:
    """Train the tiny model into root/name (once per session for each name) on synthetic data (`classed`:
    with the class fields of `classed_sequences`); returns checkpoints/last.pt."""
    from streamtrain.dataset.synthetic import write_synthetic
    from streamtrain.train.run import run_fit

    if name not in _trained:
        data = root / "train-data"
        if classed:
            write_dataset(data, classed_sequences(24, seed=0))
        else:
            write_synthetic(data, num_sequences=24, length=20, dim=DIM, seed=0)
        out = root / name
        assert run_fit({**TINY, "data": str(data), "out": str(out), **flags}) == 0
        _trained[name] = out / "checkpoints" / "last.pt"
    return _trained[name]


def varied_sequences(n: int = 13, seed: int = 0, longest: int = 40) -> list[np.ndarray]:
    """n sequences of the training data's system (other draws: another length) cut to lengths 2..longest (some longer than the model's 16-vector context)."""
    from streamtrain.dataset.synthetic import synthetic_sequences

    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, longest + 1, size=n)
    lengths[0], lengths[1] = 2, longest
    return [s[:L] for s, L in zip(synthetic_sequences(n, longest, DIM, seed), lengths)]


def write_varied(root: Path, n: int = 13) -> tuple[Path, list[np.ndarray]]:
    seqs = varied_sequences(n)
    write_dataset(root, seqs, shard_bytes=2000)
    return root, seqs


CLASS_FIELDS = (0, 3)  # classed_sequences: fields 0..2 one-hot encode a class


def classed_sequences(n: int, seed: int = 0, longest: int = 30) -> list[np.ndarray]:
    """Synthetic sequences whose fields 0..2 one-hot encode a class that mostly cycles 0, 1, 2 (a learnable
    next class), lengths 2..longest."""
    seqs = varied_sequences(n, seed, longest)
    rng = np.random.default_rng(seed + 100)
    for s in seqs:
        cls = (np.arange(len(s)) + rng.integers(3)) % 3
        flip = rng.random(len(s)) < 0.1
        cls[flip] = rng.integers(3, size=int(flip.sum()))
        s[:, 0:3] = np.eye(3, dtype=np.float32)[cls]
    return seqs


# One tiny trained run and one dataset of varied lengths for every eval test module (nothing writes into
# them): the modules import these fixtures, so the model is trained once per session, not once per module.
@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def varied(tmp_path_factory):
    return write_varied(tmp_path_factory.mktemp("varied") / "data")

