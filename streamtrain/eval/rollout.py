"""Rollout: feed the model's own predictions back for K steps after a prefix of real vectors, with a KV cache
(one new position per step) or, as a reference, by re-running the whole sequence at every step; and the
rollout error per horizon step against persistence and the mean, for `eval --horizon`.

Which rows a rollout starts from (the loader yields windows of the training context):
  prefix None  after the whole sequence, from its last window (up to one context of history): a forecast
               of the K vectors past its end
  prefix P     after its first min(P, length) vectors, from its first window (so P <= the context)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from streamtrain.data.batch import Standardizer
from streamtrain.eval.outputs import ModelOutputs
from streamtrain.model.transformer import KVCache

__all__ = ["rollout", "rollout_rows", "RolloutSums"]

Feedback = Callable[[torch.Tensor], torch.Tensor]  # standardized prediction (B, D) -> the next input (B, D)


@torch.no_grad()
def rollout(model, x_std: torch.Tensor, lengths: torch.Tensor, horizon: int, offsets: torch.Tensor | None = None,
            cached: bool = True, feedback: Feedback | None = None) -> torch.Tensor:
    """(B, K) standardized predictions of vectors lengths[b] .. lengths[b] + K - 1 of each row, each fed back
    as the next input (through `feedback`, e.g. one-hot argmax of class fields; default as is).

    x_std: (B, Tp, D) standardized prefixes, right-padded; lengths: (B,) real vectors of each (>= 1);
    offsets: (B,) position of each row's first vector in its sequence (default 0). The model runs in eval
    mode. cached: a KV cache, so each step costs one position; else every step re-runs the whole row."""
    B, Tp, D = x_std.shape
    device = x_std.device
    lengths = lengths.to(device)
    offsets = torch.zeros(B, dtype=torch.int64, device=device) if offsets is None else offsets.to(device)
    feedback = feedback or (lambda p: p)
    rows = torch.arange(B, device=device)
    out = []
    if cached:
        cache = KVCache(B, Tp + horizon, model.cfg, device, x_std.dtype)
        t = torch.arange(Tp, device=device)
        pred = model.step_cached(x_std, offsets[:, None] + t, cache, valid=t[None, :] < lengths[:, None])
        nxt = pred[rows, lengths - 1]  # (B, D) the prediction of vector lengths[b]
        for step in range(horizon):
            out.append(nxt)
            if step + 1 < horizon:
                position = (offsets + lengths + step)[:, None]  # where the fed-back vector sits, (B, 1)
                nxt = model.step_cached(feedback(nxt)[:, None], position, cache)[:, 0]
        return torch.stack(out, dim=1)
    buf = torch.zeros(B, Tp + horizon, D, device=device, dtype=x_std.dtype)
    buf[:, :Tp] = x_std
    for step in range(horizon):
        # right padding and the causal mask: row b's output at lengths[b] - 1 + step sees only real vectors
        pred = model(buf[:, : Tp + step], offsets if bool(offsets.any()) else None)
        nxt = pred[rows, lengths - 1 + step]
        out.append(nxt)
        buf[rows, lengths + step] = feedback(nxt)
    return torch.stack(out, dim=1)


def rollout_rows(batch, lengths_by_id: np.ndarray, prefix: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(row indices of `batch` a rollout starts from, prefix length within each row): see the module
    docstring. Each sequence has exactly one such row in an epoch."""
    n = batch.lengths.numpy()
    offsets = batch.offsets.numpy()
    if prefix is None:
        rows = np.flatnonzero(offsets + n == lengths_by_id[batch.ids.numpy()])
        return rows, n[rows]
    rows = np.flatnonzero(offsets == 0)
    return rows, np.minimum(n[rows], prefix)


class RolloutSums:
    """Float64 sums of squared rollout errors per horizon step (mean over dims), in original units, for the
    model, persistence (the last prefix vector repeated) and the mean predictor, over the sequences whose
    first window holds prefix + horizon vectors."""

    def __init__(self, model, standardizer: Standardizer, horizon: int, prefix: int, data_mean):
        self.model, self.standardizer, self.horizon, self.prefix = model, standardizer, horizon, prefix
        self.outputs = ModelOutputs(standardizer, model.cfg.categorical_groups)
        device = standardizer.mean64.device
        self.data_mean = torch.as_tensor(np.asarray(data_mean, np.float64), device=device)
        self.model_sq = torch.zeros(horizon, dtype=torch.float64, device=device)
        self.persistence_sq = torch.zeros_like(self.model_sq)
        self.mean_sq = torch.zeros_like(self.model_sq)
        self.num_sequences = 0

    def add(self, batch) -> None:
        P, K = self.prefix, self.horizon
        rows = np.flatnonzero((batch.offsets.numpy() == 0) & (batch.lengths.numpy() >= P + K))
        if len(rows) == 0:
            return
        device = self.standardizer.mean64.device
        idx = torch.from_numpy(rows)
        x = batch.x[idx, : P + K].to(device)  # (N, P + K, D) original units, all real
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=device)
        x_std = self.standardizer(x, mask)
        lengths = torch.full((len(rows),), P, dtype=torch.int64, device=device)
        pred = self.outputs.original(rollout(self.model, x_std[:, :P], lengths, K, feedback=self.outputs.feedback))  # (N, K, D)
        truth = x[:, P : P + K].double()
        sq = lambda p: ((p - truth) ** 2).mean(dim=2).sum(dim=0)  # noqa: E731  (K,)
        self.model_sq += sq(pred)
        self.persistence_sq += sq(x[:, P - 1 : P].double().expand_as(truth))
        self.mean_sq += sq(self.data_mean.expand_as(truth))
        self.num_sequences += len(rows)

    def summary(self) -> dict:
        n = self.num_sequences
        per = lambda s: (s / n).tolist() if n else [None] * self.horizon  # noqa: E731
        return {"prefix": self.prefix, "horizon": self.horizon, "num_sequences": n, "mse": per(self.model_sq),
                "persistence_mse": per(self.persistence_sq), "mean_mse": per(self.mean_sq)}
