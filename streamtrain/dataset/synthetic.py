"""Synthetic, learnable training data: a random stable linear dynamical system observed through a random
matrix with noise, written as an ordinary dataset with format.DatasetWriter.

    z[t+1] = A z[t] + w[t]         A: block-diagonal 2x2 rotations (random angle) damped by rho < 1
    x[t]   = C z[t] + b + v[t]      C: random (dim, dim), b: random offset, w, v: small Gaussian noise

The next vector is a fixed linear function of the recent past plus noise, so a model that learns the system
drives the loss well below both the persistence and the mean predictors, and the loss visibly drops within a
few hundred steps. Everything is a pure function of (num_sequences, length, dim, seed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from streamtrain.dataset.index import Index, is_dataset, read_index
from streamtrain.dataset.writer import DatasetWriter

__all__ = ["write_synthetic", "synthetic_sequences"]


def synthetic_sequences(num_sequences: int, length: int, dim: int = 28, seed: int = 0):
    """Yield `num_sequences` float32 arrays of shape (length, dim)."""
    rng = np.random.default_rng([seed, 0x5EED])
    half = (dim + 1) // 2
    angles = rng.uniform(0.05, 0.8, size=half)  # radians per step: periods of ~8 to ~125 steps
    rho = rng.uniform(0.95, 0.995, size=half)
    A = np.zeros((2 * half, 2 * half))
    for k in range(half):
        c, s = np.cos(angles[k]), np.sin(angles[k])
        A[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = rho[k] * np.array([[c, -s], [s, c]])
    C = rng.normal(0.0, 1.0 / np.sqrt(2 * half), size=(dim, 2 * half))
    offset = rng.normal(0.0, 1.0, size=dim)
    state_noise, obs_noise = 0.1, 0.05
    # Stationary scale of each rotation block: var = q / (1 - rho^2); start there so sequences have no burn-in.
    z_scale = np.repeat(state_noise / np.sqrt(1.0 - rho**2), 2)
    for _ in range(num_sequences):
        z = rng.normal(0.0, 1.0, size=2 * half) * z_scale
        w = rng.normal(0.0, state_noise, size=(length, 2 * half))
        zs = np.empty((length, 2 * half))
        for t in range(length):
            zs[t] = z
            z = A @ z + w[t]
        x = zs @ C.T + offset + rng.normal(0.0, obs_noise, size=(length, dim))
        yield x.astype(np.float32)


def write_synthetic(root: str | os.PathLike, num_sequences: int, length: int, dim: int = 28, seed: int = 0) -> Index:
    """Write the synthetic dataset into `root` (reused as is when it already holds the same one)."""
    root = Path(root)
    spec = {"num_sequences": num_sequences, "length": length, "dim": dim, "seed": seed}
    if is_dataset(root):
        index = read_index(root)
        if index.extra.get("synthetic") == spec:
            return index
    with DatasetWriter(root, dim=dim, extra={"synthetic": spec}) as writer:
        for i, seq in enumerate(synthetic_sequences(num_sequences, length, dim, seed)):
            writer.add(seq, path="synthetic", line=i)
    return read_index(root)
