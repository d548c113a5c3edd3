"""`streamtrain predict`: ids and values against a direct forward pass one sequence at a time, the file's
schema (pyarrow alone reads it), and bad input as one line."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from eval_support import DIM, TINY
from eval_support import checkpoint, varied  # noqa: F401 (shared fixtures)

from conftest import write_dataset
from streamtrain.cli import main


def reference_predictions(checkpoint, seq, context):
    """Teacher-forced predictions of one sequence, float64, in original units: windows of `context` vectors
    starting every context - 1 (encoded at their positions); position t from the window whose inner part
    holds t, the last position from the last window."""
    ckpt = torch.load(checkpoint, weights_only=True)
    from streamtrain.model import ModelConfig
    from streamtrain.model.transformer import CausalTransformer

    model = CausalTransformer(ModelConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    mean = np.asarray(ckpt["stats"]["mean"], np.float64)
    std = np.asarray(ckpt["stats"]["std"], np.float64)
    std = np.where(std > 0, std, 1.0)
    s = seq.astype(np.float64)
    out = np.full(s.shape, np.nan)
    for start in range(0, len(s) - 1, context - 1):
        w = s[start : start + context]
        x = torch.from_numpy(((w - mean) / std).astype(np.float32))[None]
        with torch.no_grad():
            pred = model(x, torch.tensor([start]))[0].double().numpy() * std + mean
        out[start : start + len(w)] = pred  # a later window overwrites the overlap
    return out


def _read(path):
    with pa.memory_map(str(path)) as f:
        return pa.ipc.open_file(f).read_all()


def test_predict_matches_a_forward_pass_of_each_sequence(tmp_path, checkpoint, varied, capsys):
    root, seqs = varied
    out = tmp_path / "preds.arrow"
    assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(root), "--out", str(out),
                 "--batch-tokens", "64", "--device", "cpu"]) == 0
    table = _read(out)
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("prediction").type == pa.list_(pa.list_(pa.float32(), DIM))
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(len(seqs)))  # every sequence once
    assert max(len(s) for s in seqs) > TINY["max_len"]  # some arrive as several windows
    for seq_id, rows in zip(ids, table.column("prediction").to_pylist()):
        got = np.asarray(rows, np.float64)
        ref = reference_predictions(checkpoint, seqs[seq_id], TINY["max_len"])
        assert got.shape == seqs[seq_id].shape
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed


def _one_line(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0]


def test_predict_with_a_missing_checkpoint_is_one_line(tmp_path, varied, capsys):
    root, _ = varied
    code = main(["predict", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(root), "--out", str(tmp_path / "p.arrow")])
    _one_line(code, capsys.readouterr().err, "none.pt", "no such checkpoint")
    assert not (tmp_path / "p.arrow").exists()


def test_predict_on_vectors_of_another_width_is_one_line(tmp_path, checkpoint, capsys):
    root = tmp_path / "wide"
    write_dataset(root, [np.ones((5, DIM + 1), np.float32)])
    code = main(["predict", "--checkpoint", str(checkpoint), "--data", str(root), "--out", str(tmp_path / "p.arrow")])
    _one_line(code, capsys.readouterr().err, f"{DIM + 1} dims", f"expects {DIM}")
