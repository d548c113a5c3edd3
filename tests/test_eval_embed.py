"""`streamtrain embed`: shape, values against each sequence alone, padding invariance, determinism."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from eval_support import TINY
from eval_support import checkpoint, varied  # noqa: F401 (shared fixtures)

from streamtrain.cli import main


def _embed(tmp_path, checkpoint, root, *extra, name="emb.arrow"):
    out = tmp_path / name
    assert main(["embed", "--checkpoint", str(checkpoint), "--data", str(root), "--out", str(out), "--quiet", *extra]) == 0
    with pa.memory_map(str(out)) as f:
        table = pa.ipc.open_file(f).read_all()
    ids = np.asarray(table.column("id").to_pylist())
    emb = np.asarray(table.column("embedding").to_pylist(), np.float64)
    order = np.argsort(ids)
    return table, ids[order], emb[order]


def _states_alone(checkpoint, seq, context):
    """(L, d_model) final hidden states of one sequence alone, in windows of `context` starting every
    context - 1 vectors; where windows overlap, the later one's."""
    import streamtrain

    model, standardizer, _ = streamtrain.load_model(checkpoint)
    x = (seq.astype(np.float64) - standardizer.mean) / standardizer.std
    out = np.zeros((len(seq), model.cfg.d_model))
    for start in range(0, len(seq) - 1, context - 1):
        w = torch.from_numpy(x[start : start + context].astype(np.float32))[None]
        with torch.no_grad():
            out[start : start + w.shape[1]] = model.features(w, torch.tensor([start]))[0].double().numpy()
    return out


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_embed_shape_and_values_against_each_sequence_alone(tmp_path, checkpoint, varied, pool):
    root, seqs = varied
    table, ids, emb = _embed(tmp_path, checkpoint, root, "--pool", pool, "--batch-tokens", "64")
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), TINY["d_model"])
    assert list(ids) == list(range(len(seqs))) and emb.shape == (len(seqs), TINY["d_model"])
    for i, seq in enumerate(seqs):
        states = _states_alone(checkpoint, seq, TINY["max_len"])
        ref = states.mean(axis=0) if pool == "mean" else states[-1]
        np.testing.assert_allclose(emb[i], ref, rtol=1e-4, atol=1e-5)


def test_embed_does_not_depend_on_padding_and_is_deterministic(tmp_path, checkpoint, varied):
    root, _ = varied
    _, ids_small, small = _embed(tmp_path, checkpoint, root, "--batch-tokens", "32", name="a.arrow")
    _, ids_big, big = _embed(tmp_path, checkpoint, root, "--batch-tokens", "640", name="b.arrow")
    assert list(ids_small) == list(ids_big)
    np.testing.assert_allclose(small, big, rtol=1e-5, atol=1e-6)  # other batches, other padding
    _, _, again = _embed(tmp_path, checkpoint, root, "--batch-tokens", "640", name="c.arrow")
    assert np.array_equal(big, again)


def test_embed_of_a_missing_checkpoint_is_one_line(tmp_path, varied, capsys):
    root, _ = varied
    code = main(["embed", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(root), "--out", str(tmp_path / "e.arrow")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope.pt: no such checkpoint" in err
