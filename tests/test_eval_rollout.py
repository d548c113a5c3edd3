"""Rollout: the KV-cached rollout equals re-running the sequence at every step and a one-row-at-a-time
reference; `predict --horizon` and `eval --horizon` against that reference."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from eval_support import DIM, TINY
from eval_support import checkpoint, varied  # noqa: F401 (shared fixtures)

from streamtrain.cli import main
from streamtrain.eval.rollout import rollout
from streamtrain.model import ModelConfig
from streamtrain.model.transformer import CausalTransformer


def one_row_rollout(model, prefix_std, horizon, offset=0, feedback=lambda v: v):
    """The rollout of one row, re-running the growing sequence alone at every step (no padding, no cache)."""
    seq = prefix_std.clone()
    out = []
    with torch.no_grad():
        for _ in range(horizon):
            nxt = model(seq[None], torch.tensor([offset]))[0, -1]
            out.append(nxt)
            seq = torch.cat([seq, feedback(nxt[None])], dim=0)
    return torch.stack(out)


@pytest.fixture
def random_model(deterministic_rng):
    model = CausalTransformer(ModelConfig(dim=5, d_model=32, layers=3, heads=4, ff=48))
    with torch.no_grad():  # larger weights than the init, so that errors would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("cached", [True, False])
def test_rollout_of_a_padded_batch_equals_each_row_alone(random_model, cached):
    torch.manual_seed(1)
    lengths = torch.tensor([7, 1, 4, 7])
    offsets = torch.tensor([0, 0, 30, 3])
    x = torch.randn(4, 7, 5)
    x[torch.arange(7)[None, :] >= lengths[:, None]] = 0.0  # right padding
    feedback = lambda v: torch.tanh(v) * 2  # noqa: E731  a non-trivial feed-back, as categorical fields use
    got = rollout(random_model, x, lengths, horizon=6, offsets=offsets, cached=cached, feedback=feedback)
    assert got.shape == (4, 6, 5)
    for b in range(4):
        ref = one_row_rollout(random_model, x[b, : lengths[b]], 6, int(offsets[b]), feedback)
        torch.testing.assert_close(got[b], ref, rtol=1e-5, atol=1e-5)


def test_cached_and_uncached_rollouts_agree(random_model):
    torch.manual_seed(2)
    x = torch.randn(3, 12, 5)
    lengths = torch.tensor([12, 5, 9])
    x[torch.arange(12)[None, :] >= lengths[:, None]] = 0.0
    cached = rollout(random_model, x, lengths, horizon=20)
    uncached = rollout(random_model, x, lengths, horizon=20, cached=False)
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


def _load(checkpoint):
    import streamtrain

    return streamtrain.load_model(checkpoint)


def _reference(checkpoint, seq, start, stop, horizon):
    """One-row rollout of seq[start:stop] (positions start...) in original units, float64."""
    model, standardizer, _ = _load(checkpoint)
    mean, std = standardizer.mean, standardizer.std
    x = torch.from_numpy(((seq[start:stop].astype(np.float64) - mean) / std).astype(np.float32))
    return one_row_rollout(model, x, horizon, start).double().numpy() * std + mean


def _read(path):
    with pa.memory_map(str(path)) as f:
        return pa.ipc.open_file(f).read_all()


@pytest.mark.parametrize("prefix", [None, 5])
def test_predict_horizon_matches_the_one_row_reference(tmp_path, checkpoint, varied, prefix):
    root, seqs = varied
    out = tmp_path / "roll.arrow"
    argv = ["predict", "--checkpoint", str(checkpoint), "--data", str(root), "--out", str(out), "--horizon", "4",
            "--batch-tokens", "64", "--quiet"]
    assert main(argv + ([] if prefix is None else ["--prefix", str(prefix)])) == 0
    table = _read(out)
    assert table.column_names == ["id", "prefix", "rollout"]
    assert table.schema.field("rollout").type == pa.list_(pa.list_(pa.float32(), DIM))
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(len(seqs)))
    context = TINY["max_len"]
    for seq_id, before, rows in zip(ids, table.column("prefix").to_pylist(), table.column("rollout").to_pylist()):
        seq = seqs[seq_id]
        L = len(seq)
        if prefix is None:  # after the whole sequence, from its last window
            assert before == L
            start = 0 if L <= context else ((L - 2) // (context - 1)) * (context - 1)
        else:
            assert before == min(prefix, L)
            start = 0
        ref = _reference(checkpoint, seq, start, before, 4)
        got = np.asarray(rows, np.float64)
        assert got.shape == (4, DIM)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_eval_horizon_reports_each_step_against_a_reference(tmp_path, checkpoint, varied, capsys):
    root, seqs = varied
    P, K = 4, 3
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(root), "--json", "--horizon", str(K),
                 "--prefix", str(P), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)["rollout"]
    data_mean = np.concatenate(seqs).astype(np.float64).mean(axis=0)
    scored = [s for s in seqs if len(s) >= P + K]
    assert report["num_sequences"] == len(scored) and 0 < len(scored) < len(seqs)
    model_sq, pers_sq, mean_sq = [], [], []
    for s in scored:
        truth = s[P : P + K].astype(np.float64)
        model_sq.append(((_reference(checkpoint, s, 0, P, K) - truth) ** 2).mean(axis=1))
        pers_sq.append(((s[P - 1].astype(np.float64) - truth) ** 2).mean(axis=1))
        mean_sq.append(((data_mean - truth) ** 2).mean(axis=1))
    np.testing.assert_allclose(report["mse"], np.mean(model_sq, axis=0), rtol=1e-4)
    np.testing.assert_allclose(report["persistence_mse"], np.mean(pers_sq, axis=0), rtol=1e-9)
    np.testing.assert_allclose(report["mean_mse"], np.mean(mean_sq, axis=0), rtol=1e-5)


@pytest.mark.parametrize("argv, fragment", [
    (["predict", "--horizon", "3", "--prefix", "99"], "--prefix must be in [1, 16]"),
    (["predict", "--horizon", "0"], "--horizon must be >= 1"),
    (["predict", "--prefix", "3"], "--prefix needs --horizon"),
    (["eval", "--horizon", "20"], "must be at most the training context (16 vectors)"),
])
def test_bad_horizon_or_prefix_is_one_line(tmp_path, checkpoint, varied, capsys, argv, fragment):
    root, _ = varied
    out = ["--out", str(tmp_path / "r.arrow")] if argv[0] == "predict" else []
    code = main([argv[0], "--checkpoint", str(checkpoint), "--data", str(root), *out, *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err


def test_a_rollout_feeds_class_groups_back_as_the_one_hot_of_their_argmax():
    from streamtrain.data.batch import Standardizer
    from streamtrain.eval.outputs import ModelOutputs

    mean, std = np.array([0.2, 0.3, 0.5, 10.0]), np.array([0.4, 0.45, 0.5, 2.0])
    outputs = ModelOutputs(Standardizer(mean, std, torch.device("cpu")), [(0, 3)])
    pred = torch.tensor([[0.1, 3.0, -1.0, 0.5]])  # logits (0.1, 3, -1), the number 0.5 standardized
    fed = outputs.feedback(pred).double().numpy()[0]
    np.testing.assert_allclose(fed * std + mean, [0.0, 1.0, 0.0, 11.0], atol=1e-6)
    probs = outputs.original(pred).numpy()[0]
    e = np.exp([0.1, 3.0, -1.0])
    np.testing.assert_allclose(probs, [*(e / e.sum()), 11.0], rtol=1e-6)
