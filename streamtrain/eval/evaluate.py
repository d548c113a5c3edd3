"""Evaluation of next-vector prediction against two baselines, accumulated in float64 over valid targets only."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from streamtrain.data.batch import Standardizer, model_offsets

__all__ = [
    "EvalSums",
    "accumulate_eval",
    "eval_summary",
    "evaluate_checkpoint",
    "eval_context",
]


class EvalSums:
    """Per-dimension float64 sums of squared errors; `as_tensor`/`from_tensor` pack them for an all-reduce."""

    def __init__(self, dim: int, device: torch.device, groups: list[tuple[int, int]] = ()):
        self.dim = dim
        self.groups = list(groups)  # field groups whose top-1 class is scored
        z = lambda: torch.zeros(dim, dtype=torch.float64, device=device)  # noqa: E731
        self.model, self.persistence, self.mean, self.standardized = z(), z(), z(), z()
        self.counts = torch.zeros(3, dtype=torch.float64, device=device)  # targets, tokens, sequences
        # top-1 hits of each group: model, previous vector, most frequent class
        self.onehot_correct = torch.zeros(3 * len(self.groups), dtype=torch.float64, device=device)

    def as_tensor(self) -> torch.Tensor:
        return torch.cat([self.model, self.persistence, self.mean, self.standardized, self.counts, self.onehot_correct])

    def load_tensor(self, t: torch.Tensor) -> None:
        D = self.dim
        self.model, self.persistence, self.mean, self.standardized = t[:D], t[D : 2 * D], t[2 * D : 3 * D], t[3 * D : 4 * D]
        self.counts = t[4 * D : 4 * D + 3]
        self.onehot_correct = t[4 * D + 3 :]


@torch.no_grad()
def accumulate_eval(
    model: torch.nn.Module,
    batches,
    sums: EvalSums,
    mean: np.ndarray,
    std: np.ndarray,
    data_mean: np.ndarray,
    device: torch.device,
    autocast=contextlib.nullcontext,
    onehot: tuple[int, int] | None = None,
) -> EvalSums:
    """Add the squared errors of `model` and both baselines over every batch of `batches` to `sums`, and the
    top-1 hits of each of `sums.groups` (with `onehot`, and `sums` built without groups: that group).
    `mean`/`std` standardize the model's inputs (training statistics); `data_mean` is the mean predictor.
    The model's class groups (`--categorical`) are scored as probabilities (`outputs.ModelOutputs`)."""
    from streamtrain.eval.outputs import ModelOutputs

    standardize = Standardizer(mean, std, device)
    outputs = ModelOutputs(standardize, model.cfg.categorical_groups)
    if onehot is not None and not sums.groups:
        sums.groups = [tuple(onehot)]
        sums.onehot_correct = torch.zeros(3, dtype=torch.float64, device=device)
    mean64, std64 = standardize.mean64, standardize.std64
    data_mean64 = torch.as_tensor(data_mean, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch.x.to(device, non_blocking=True)  # (B, T, D) original units, zero pads
            mask = batch.mask.to(device, non_blocking=True)  # (B, T)
            x_std = standardize(x, mask)
            with autocast():
                pred = model(x_std, model_offsets(batch, device))  # (B, T, D) standardized prediction of x[t+1]
            valid = mask[:, 1:, None]  # (B, T-1, 1): target t+1 is real
            target = x[:, 1:].double()  # (B, T-1, D)
            pred64 = outputs.standardized(pred[:, :-1])
            pred_orig = outputs.original(pred[:, :-1])
            err = lambda p: ((p - target) ** 2).masked_fill(~valid, 0.0).sum(dim=(0, 1))  # noqa: E731
            sums.model += err(pred_orig)
            sums.persistence += err(x[:, :-1].double())
            sums.mean += err(data_mean64.expand_as(target))
            sums.standardized += ((pred64 - (target - mean64) / std64) ** 2).masked_fill(~valid, 0.0).sum(dim=(0, 1))
            for g, (a, b) in enumerate(sums.groups):
                truth = target[..., a:b].argmax(-1)  # (B, T-1)
                hits = lambda cls: ((cls == truth) & valid[..., 0]).sum()  # noqa: E731
                frequent = int(mean64[a:b].argmax())
                sums.onehot_correct[3 * g : 3 * g + 3] += torch.stack(
                    [hits(pred_orig[..., a:b].argmax(-1)), hits(x[:, :-1, a:b].argmax(-1)), hits(torch.full_like(truth, frequent))]
                ).double()
            lengths = batch.lengths
            # A sequence longer than the loader's max_len arrives as windows overlapping by one vector: each
            # target is still scored once; count each sequence and vector once too.
            later_windows = int((batch.offsets > 0).sum())
            sums.counts += torch.tensor(
                [
                    float((lengths - 1).clamp(min=0).sum()),
                    float(lengths.sum() - later_windows),
                    float(len(lengths) - later_windows),
                ],
                dtype=torch.float64,
                device=device,
            )
    finally:
        model.train(was_training)
    return sums


def eval_summary(sums: EvalSums, onehot: tuple[int, int] | None = None,
                 categorical: list[tuple[int, int]] = ()) -> dict:
    """The eval report: MSE in original units, both baselines, skill scores, per-dimension MSE, counts, and
    with `onehot`, top-1 accuracies of that field group.

    For every position t with t + 1 < length, the target is x[t+1] (original units) and the predictions are
        model        the Transformer's output at t, un-standardized with the checkpoint's mean/std
        persistence  x[t]: "the next vector equals the current one"
        mean         the per-dimension mean of the evaluated dataset (index.json), so mean_mse is the targets'
                     variance and skill_vs_mean is the coefficient of determination R^2
    Skill scores are 1 - mse / baseline_mse: 0 means no better than the baseline, 1 a perfect prediction.

    With `onehot=(start, end)` (a group of fields that one-hot encodes a class, such as the opcode class of an
    instruction vector), the report also gives top-1 accuracy of argmax over those fields for the model, for
    "same class as the previous vector", and for the training set's most frequent class (the argmax of the
    training mean over the group, which for one-hot fields is the class frequency). `categorical`: the same
    for each class group the model was trained with, as a list under "categorical".
    """
    num_targets = int(sums.counts[0].item())
    denom = max(num_targets, 1)
    per_dim = (sums.model / denom).cpu().numpy()
    mse = float(per_dim.mean())
    persistence_mse = float((sums.persistence / denom).mean().item())
    mean_mse = float((sums.mean / denom).mean().item())

    def skill(baseline: float) -> float | None:
        return 1.0 - mse / baseline if baseline > 0 and num_targets else None

    report = {
        "mse": mse if num_targets else None,
        "persistence_mse": persistence_mse if num_targets else None,
        "mean_mse": mean_mse if num_targets else None,
        "skill_vs_persistence": skill(persistence_mse),
        "skill_vs_mean": skill(mean_mse),
        "per_dim_mse": [float(v) for v in per_dim] if num_targets else [],
        "standardized_mse": float((sums.standardized / denom).mean().item()) if num_targets else None,
        "num_sequences": int(sums.counts[2].item()),
        "num_tokens": int(sums.counts[1].item()),
        "num_targets": num_targets,
    }

    def top1(group: tuple[int, int]) -> dict:
        g = sums.groups.index(tuple(group))
        acc = (sums.onehot_correct[3 * g : 3 * g + 3] / denom).tolist() if num_targets else [None] * 3
        return {"fields": list(group), "accuracy": acc[0], "previous_accuracy": acc[1], "most_frequent_accuracy": acc[2]}

    if onehot is not None:
        report["onehot"] = top1(onehot)
    if categorical:
        report["categorical"] = [top1(group) for group in categorical]
    return report


def eval_context(train_config: dict, batch_tokens: int) -> tuple[int, int]:
    """(max_len, max_tokens) to evaluate a model trained with `train_config` (RunConfig.to_json()) at: windows
    of the context it was trained with (its --max-len, else the longest row its --batch-tokens held), and
    a batch budget of at least one such row. Windowing at eval's own budget would score positions the model
    never attended over, and make the result depend on eval's --batch-tokens."""
    from streamtrain.data import bucketing
    from streamtrain.train.config import DataConfig

    pad = bucketing.DEFAULT_PAD_MULTIPLE
    data = train_config.get("data", {})
    max_len = data.get("max_len") or bucketing.longest_row(data.get("batch_tokens", DataConfig.batch_tokens), pad)
    return max_len, max(batch_tokens, -(-max_len // pad) * pad)


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    data_dir: str | Path,
    batch_tokens: int = 4096,
    device: str = "auto",
    num_workers: int = 0,
    onehot: tuple[int, int] | None = None,
    verify: bool = True,
    horizon: int | None = None,
    prefix: int | None = None,
    ema: bool = False,
    cache_dir: str | None = None,
    cache_limit: str | None = None,
) -> dict:
    """Load a checkpoint and evaluate it on the dataset in `data_dir` (every sequence once, in order), in
    windows of the training context (`eval_context`); the report adds that window length (`max_len`) and
    the batch budget used (`batch_tokens`, raised from the one given when a window needs more).
    `verify`: check the dataset's checksums before use (see ShardStream). `horizon`: also roll out that many
    steps after `prefix` vectors (default min(8, context - horizon)) of each sequence whose first window holds
    prefix + horizon vectors, and report the error per step under "rollout" (`rollout.RolloutSums`).
    `ema`: evaluate the EMA weights of the checkpoint. `cache_dir`, `cache_limit`: for a dataset URL, its
    node-local cache."""
    from streamtrain.data import ShardStream, make_loader
    from streamtrain.errors import UserError
    from streamtrain.eval.load import load_model

    from streamtrain.storage.remote import open_index

    model, standardizer, config = load_model(checkpoint_path, device, ema=ema)
    dev = standardizer.mean64.device
    index = open_index(data_dir, cache_dir)
    if index.dim != config.model.dim:
        raise UserError(f"--data {data_dir}: vectors have {index.dim} dims, the checkpoint's model expects {config.model.dim}")
    if onehot is not None and not 0 <= onehot[0] < onehot[1] <= index.dim:
        raise UserError(f"--onehot {onehot[0]}:{onehot[1]}: needs 0 <= START < END <= {index.dim}")
    mean, std = standardizer.mean, standardizer.std
    max_len, max_tokens = eval_context(config.to_json(), batch_tokens)
    stream = ShardStream(str(data_dir), max_tokens=max_tokens, seed=0, shuffle=False, rank=0, world_size=1,
                         max_len=max_len, verify=verify, cache_dir=cache_dir, cache_limit=cache_limit)
    loader = make_loader(stream, num_workers=num_workers, pin_memory=dev.type == "cuda")
    batches, rollouts = loader, None
    if horizon is not None:
        rollouts = _rollout_sums(model, standardizer, index.mean, horizon, prefix, max_len)
        batches = _also_into(loader, rollouts)
    categorical = config.model.categorical_groups
    groups = list(dict.fromkeys(([tuple(onehot)] if onehot is not None else []) + categorical))
    sums = accumulate_eval(model, batches, EvalSums(index.dim, dev, groups), mean, std, index.mean, dev)
    report = {**eval_summary(sums, onehot, categorical), "max_len": max_len, "batch_tokens": max_tokens}
    if rollouts is not None:
        report["rollout"] = rollouts.summary()
    return report


def _rollout_sums(model, standardizer, data_mean, horizon: int, prefix: int | None, max_len: int):
    from streamtrain.errors import UserError
    from streamtrain.eval.rollout import RolloutSums

    if horizon < 1:
        raise UserError(f"--horizon must be >= 1, got {horizon}")
    if prefix is None:
        prefix = min(8, max_len - horizon)
    if prefix < 1 or prefix + horizon > max_len:
        raise UserError(
            f"--prefix {prefix} + --horizon {horizon} must be at most the training context ({max_len} vectors), "
            "with a prefix of at least 1: the truth of a rollout comes from a sequence's first window"
        )
    return RolloutSums(model, standardizer, horizon, prefix, data_mean)


def _also_into(batches, rollouts):
    for batch in batches:
        rollouts.add(batch)
        yield batch
