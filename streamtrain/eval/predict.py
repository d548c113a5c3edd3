"""Teacher-forced predictions of a trained model for every position of every sequence of a dataset, in
original units, and `predict_file`, which writes them as an Arrow IPC file (see `arrow_out`).

The dataset is read through the bucketed loader in windows of the training context, as eval scores it; a
sequence longer than that arrives as windows overlapping by one vector, and its predictions are stitched
back: position t's prediction comes from the window whose inner positions hold t (the last window also
gives the prediction past the sequence's end), so every position is predicted once, from up to one context
of history.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from streamtrain.data.batch import Standardizer, model_offsets
from streamtrain.errors import UserError
from streamtrain.eval.arrow_out import sequences_array, sequences_type, write_arrow_rows
from streamtrain.eval.outputs import ModelOutputs

__all__ = ["ModelData", "open_model_data", "predict_sequences", "rollout_sequences", "predict_file"]


@dataclass
class ModelData:
    """A dataset read for a model: its loader in windows of the training context, and the lengths by id."""

    loader: object
    lengths: np.ndarray  # (num_sequences,) int, by global id
    dim: int
    max_len: int  # the window length (the training context)
    max_tokens: int  # the batch budget used


def open_model_data(config, data_dir: str | os.PathLike, batch_tokens: int = 4096, num_workers: int = 0,
                    verify: bool = True, pin_memory: bool = False) -> ModelData:
    """The loader of `data_dir` for a model trained with `config` (RunConfig): every sequence once, in a fixed
    order, windowed at the training context (`evaluate.eval_context`). Vectors of another width than the
    model's are a UserError."""
    from streamtrain.data import ShardStream, make_loader
    from streamtrain.dataset import load_lengths, read_index
    from streamtrain.eval.evaluate import eval_context

    index = read_index(data_dir)
    if index.dim != config.model.dim:
        raise UserError(f"--data {data_dir}: vectors have {index.dim} dims, the checkpoint's model expects {config.model.dim}")
    max_len, max_tokens = eval_context(config.to_json(), batch_tokens)
    stream = ShardStream(str(data_dir), max_tokens=max_tokens, seed=0, shuffle=False, rank=0, world_size=1,
                         max_len=max_len, verify=verify)
    loader = make_loader(stream, num_workers=num_workers, pin_memory=pin_memory)
    return ModelData(loader, np.asarray(load_lengths(index)), index.dim, max_len, max_tokens)


@torch.no_grad()
def predict_sequences(model, standardizer: Standardizer, data: ModelData, advance=lambda n=1: None,
                      ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (id, predictions) for every sequence of `data`, as soon as all of its windows have been seen:
    predictions is float32 (length, D) in original units (class groups: probabilities), row t the
    prediction of vector t + 1."""
    device = standardizer.mean64.device
    outputs = ModelOutputs(standardizer, model.cfg.categorical_groups)
    pending: dict[int, list] = {}  # id -> [predictions, positions still missing]
    for batch in data.loader:
        x = batch.x.to(device, non_blocking=True)
        mask = batch.mask.to(device, non_blocking=True)
        pred = outputs.original(model(standardizer(x, mask), model_offsets(batch, device)))
        pred = pred.float().cpu().numpy()  # (B, T, D)
        for b, (seq_id, offset, n) in enumerate(zip(batch.ids.tolist(), batch.offsets.tolist(), batch.lengths.tolist())):
            length = int(data.lengths[seq_id])
            # a window's last position is the next window's first (overlap by one), except at the end
            keep = n if offset + n == length else n - 1
            entry = pending.get(seq_id)
            if entry is None:
                entry = pending[seq_id] = [np.empty((length, data.dim), np.float32), length]
            entry[0][offset : offset + keep] = pred[b, :keep]
            entry[1] -= keep
            if entry[1] == 0:
                del pending[seq_id]
                yield seq_id, entry[0]
        advance(1)
    assert not pending, f"sequences left incomplete by the loader: {sorted(pending)[:5]}"


@torch.no_grad()
def rollout_sequences(model, standardizer: Standardizer, data: ModelData, horizon: int, prefix: int | None,
                      advance=lambda n=1: None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (id, vectors of the sequence before the rollout, rollout) for every sequence of `data`: rollout
    is float32 (horizon, D) in original units (class groups: probabilities), the model's guesses for the next `horizon` vectors, each fed
    back as the next input (KV cache; class groups as the one-hot of their argmax). Where it starts: `rollout.rollout_rows`."""
    from streamtrain.eval.rollout import rollout, rollout_rows

    device = standardizer.mean64.device
    outputs = ModelOutputs(standardizer, model.cfg.categorical_groups)
    for batch in data.loader:
        rows, prefix_lengths = rollout_rows(batch, data.lengths, prefix)
        if len(rows):
            idx = torch.from_numpy(rows)
            width = int(prefix_lengths.max())
            x = batch.x[idx, :width].to(device)
            lengths = torch.from_numpy(prefix_lengths.astype(np.int64))
            mask = torch.arange(width)[None, :] < lengths[:, None]
            offsets = batch.offsets[idx]
            pred = rollout(model, standardizer(x, mask.to(device)), lengths, horizon, offsets, feedback=outputs.feedback)
            pred = outputs.original(pred).float().cpu().numpy()  # (N, K, D)
            before = (offsets.numpy() + prefix_lengths).tolist()
            for i, seq_id in enumerate(batch.ids[idx].tolist()):
                yield seq_id, before[i], pred[i]
        advance(1)


def predict_file(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike,
                 batch_tokens: int = 4096, device: str = "cpu", num_workers: int = 0, verify: bool = True,
                 ema: bool = False, quiet: bool = True, horizon: int | None = None, prefix: int | None = None) -> dict:
    """Write the predictions of `checkpoint` for every sequence of `data_dir` to the Arrow IPC file `out`
    (rows in the loader's order). Teacher-forced (`horizon` None): columns `id` (int64) and `prediction`
    (list<fixed_size_list<float32, D>>, one vector per position). A rollout of `horizon` steps after `prefix`
    vectors (None: the whole sequence): columns `id`, `prefix` (int64, real vectors before the rollout) and
    `rollout` (list<fixed_size_list<float32, D>> of `horizon` vectors). Returns a summary for the command line."""
    from streamtrain.eval.load import load_model
    from streamtrain.telemetry.progress import progress_bar

    if horizon is not None and horizon < 1:
        raise UserError(f"--horizon must be >= 1, got {horizon}")
    if prefix is not None and horizon is None:
        raise UserError("--prefix needs --horizon (how many vectors to roll out after it)")
    model, standardizer, config = load_model(checkpoint, device, ema=ema)
    data = open_model_data(config, data_dir, batch_tokens, num_workers, verify, standardizer.mean64.device.type == "cuda")
    if prefix is not None and not 1 <= prefix <= data.max_len:
        raise UserError(f"--prefix must be in [1, {data.max_len}] (the training context), got {prefix}")
    D = data.dim
    ints = lambda rows, k: pa.array([r[k] for r in rows], pa.int64())  # noqa: E731
    if horizon is None:
        schema = pa.schema([("id", pa.int64()), ("prediction", sequences_type(D))])
        columns = lambda rows: [ints(rows, 0), sequences_array([r[1] for r in rows], D)]  # noqa: E731
        label, rows = "predict", lambda advance: predict_sequences(model, standardizer, data, advance)  # noqa: E731
    else:
        schema = pa.schema([("id", pa.int64()), ("prefix", pa.int64()), ("rollout", sequences_type(D))])
        columns = lambda rows: [ints(rows, 0), ints(rows, 1), sequences_array([r[2] for r in rows], D)]  # noqa: E731
        label, rows = "rollout", lambda advance: rollout_sequences(model, standardizer, data, horizon, prefix, advance)  # noqa: E731
    with progress_bar(len(data.loader), label, quiet) as advance:
        num_rows = write_arrow_rows(out, schema, rows(advance), columns)
    return {"out": str(Path(out)), "num_sequences": num_rows, "max_len": data.max_len, "batch_tokens": data.max_tokens}
