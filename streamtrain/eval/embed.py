"""Embeddings of whole sequences from a trained model's final hidden states (after its last LayerNorm), for
similarity search and clustering, and `embed_file`, which writes them as an Arrow IPC file.

pool "mean": the mean over the sequence's real positions (never a pad; a sequence longer than the training
context is read in windows overlapping by one vector, each position counted once); "last": the state at the
last vector, which has attended over up to one context of history.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from streamtrain.data.batch import Standardizer, model_offsets
from streamtrain.errors import UserError
from streamtrain.eval.arrow_out import vectors_array, vectors_type, write_arrow_rows
from streamtrain.eval.predict import ModelData, open_model_data

__all__ = ["POOLS", "embed_sequences", "embed_file"]

POOLS = ("mean", "last")


@torch.no_grad()
def embed_sequences(model, standardizer: Standardizer, data: ModelData, pool: str = "mean",
                    advance=lambda n=1: None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (id, embedding float32 (d_model,)) for every sequence of `data`, once all its windows are seen."""
    if pool not in POOLS:
        raise UserError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    device = standardizer.mean64.device
    pending: dict[int, list] = {}  # id -> [float64 sum of states, positions still missing]
    for batch in data.loader:
        x = batch.x.to(device, non_blocking=True)
        mask = batch.mask.to(device, non_blocking=True)
        h = model.features(standardizer(x, mask), model_offsets(batch, device)).double()  # (B, T, C)
        h = h.masked_fill(~mask[..., None], 0.0).cpu().numpy()
        for b, (seq_id, offset, n) in enumerate(zip(batch.ids.tolist(), batch.offsets.tolist(), batch.lengths.tolist())):
            length = int(data.lengths[seq_id])
            is_last = offset + n == length
            keep = n if is_last else n - 1  # the overlap vector belongs to the next window
            entry = pending.setdefault(seq_id, [np.zeros(h.shape[2]), length, None])
            entry[0] += h[b, :keep].sum(axis=0)
            entry[1] -= keep
            if is_last:
                entry[2] = h[b, n - 1]
            if entry[1] == 0:
                del pending[seq_id]
                vec = entry[0] / length if pool == "mean" else entry[2]
                yield seq_id, vec.astype(np.float32)
        advance(1)
    assert not pending, f"sequences left incomplete by the loader: {sorted(pending)[:5]}"


def embed_file(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike,
               pool: str = "mean", batch_tokens: int = 4096, device: str = "cpu", num_workers: int = 0,
               verify: bool = True, ema: bool = False, quiet: bool = True) -> dict:
    """Write one embedding per sequence of `data_dir` to the Arrow IPC file `out`: columns `id` (int64) and
    `embedding` (fixed_size_list<float32, d_model>), rows in the loader's order."""
    from streamtrain.eval.load import load_model
    from streamtrain.telemetry.progress import progress_bar

    if pool not in POOLS:
        raise UserError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    model, standardizer, config = load_model(checkpoint, device, ema=ema)
    data = open_model_data(config, data_dir, batch_tokens, num_workers, verify, standardizer.mean64.device.type == "cuda")
    C = config.model.d_model
    schema = pa.schema([("id", pa.int64()), ("embedding", vectors_type(C))])

    def columns(rows):
        return [pa.array([r[0] for r in rows], pa.int64()), vectors_array(np.stack([r[1] for r in rows]))]

    with progress_bar(len(data.loader), "embed", quiet) as advance:
        num_rows = write_arrow_rows(out, schema, embed_sequences(model, standardizer, data, pool, advance), columns)
    return {"out": str(Path(out)), "num_sequences": num_rows, "d_model": C, "pool": pool}
