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

__all__ = ["ModelData", "open_model_data", "predict_sequences", "to_original_units", "predict_file"]


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


def to_original_units(pred: torch.Tensor, standardizer: Standardizer) -> torch.Tensor:
    """Model outputs (standardized predictions, (..., D)) in original units, float64."""
    return pred.double() * standardizer.std64 + standardizer.mean64


@torch.no_grad()
def predict_sequences(model, standardizer: Standardizer, data: ModelData, advance=lambda n=1: None,
                      ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (id, predictions) for every sequence of `data`, as soon as all of its windows have been seen:
    predictions is float32 (length, D) in original units, row t the prediction of vector t + 1."""
    device = standardizer.mean64.device
    pending: dict[int, list] = {}  # id -> [predictions, positions still missing]
    for batch in data.loader:
        x = batch.x.to(device, non_blocking=True)
        mask = batch.mask.to(device, non_blocking=True)
        pred = to_original_units(model(standardizer(x, mask), model_offsets(batch, device)), standardizer)
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


def predict_file(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike,
                 batch_tokens: int = 4096, device: str = "cpu", num_workers: int = 0, verify: bool = True,
                 ema: bool = False, quiet: bool = True) -> dict:
    """Write the teacher-forced predictions of `checkpoint` for every sequence of `data_dir` to the Arrow IPC
    file `out`: columns `id` (int64) and `prediction` (list<fixed_size_list<float32, D>>, one vector per
    position; rows in the loader's order). Returns a summary for the command line."""
    from streamtrain.eval.load import load_model
    from streamtrain.telemetry.progress import progress_bar

    model, standardizer, config = load_model(checkpoint, device, ema=ema)
    data = open_model_data(config, data_dir, batch_tokens, num_workers, verify, standardizer.mean64.device.type == "cuda")
    schema = pa.schema([("id", pa.int64()), ("prediction", sequences_type(data.dim))])

    def columns(rows: list[tuple[int, np.ndarray]]) -> list[pa.Array]:
        return [pa.array([r[0] for r in rows], pa.int64()), sequences_array([r[1] for r in rows], data.dim)]

    with progress_bar(len(data.loader), "predict", quiet) as advance:
        num_rows = write_arrow_rows(out, schema, predict_sequences(model, standardizer, data, advance), columns)
    return {"out": str(Path(out)), "num_sequences": num_rows, "max_len": data.max_len, "batch_tokens": data.max_tokens}
