"""The per-field-kind loss (--categorical): against a hand-computed float64 reference, padding invariance,
flag validation, and a run trained with it through fit, eval and predict."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from eval_support import CLASS_FIELDS, classed_sequences, train_tiny

from conftest import write_dataset
from streamtrain.cli import main
from streamtrain.train.loss import loss_terms, next_step_loss


def test_categorical_loss_equals_a_hand_computed_float64_reference():
    # B=1, T=3, D=4: fields 0..2 a class group, field 3 a number; targets at t=1, 2
    pred = torch.tensor([[[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, -0.5], [9.0, 9.0, 9.0, 9.0]]])
    x = torch.tensor([[[0.0, 0.0, 1.0, 3.0], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 2.0]]])  # classes 2, 0, 1
    x_std = torch.tensor([[[0.0, 0.0, 0.0, 0.25], [0.0, 0.0, 0.0, -0.75], [0.0, 0.0, 0.0, 1.5]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    got = float(next_step_loss(pred, x_std, mask, x, [(0, 3)], weight=0.5))
    # t=0 predicts class 0 from logits (2, 0, -1) and the number -0.75 from 0.5
    ce0 = -2.0 + math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-1.0))
    # t=1 predicts class 1 from logits (0, 1, 0) and 1.5 from -0.5
    ce1 = -1.0 + math.log(2 * math.exp(0.0) + math.exp(1.0))
    expected = (0.5 - -0.75) ** 2 + (-0.5 - 1.5) ** 2 + 0.5 * (ce0 + ce1)
    assert got == pytest.approx(expected, rel=1e-6)
    assert loss_terms(4, [(0, 3)]) == 2  # one number, one group per target


def test_categorical_loss_is_the_squared_error_without_groups(deterministic_rng):
    pred, x_std = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.arange(5)[None, :] < torch.tensor([[5], [3]])
    ref = sum(float(((pred[b, : n - 1] - x_std[b, 1:n]) ** 2).sum()) for b, n in enumerate([5, 3]))
    assert float(next_step_loss(pred, x_std, mask)) == pytest.approx(ref, rel=1e-6)


def test_categorical_loss_ignores_padding_and_what_it_holds(deterministic_rng):
    B, T, D = 3, 6, 7
    lengths = torch.tensor([6, 2, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    pred, x_std = torch.randn(B, T, D), torch.randn(B, T, D)
    x = torch.randn(B, T, D)
    groups = [(0, 3), (4, 6)]
    base = next_step_loss(pred, x_std, mask, x, groups, 0.7)
    # more padding columns and garbage in every padded position
    pad = lambda t: torch.cat([t, torch.randn(B, 5, D) * 100], dim=1)  # noqa: E731
    pred2, x_std2, x2 = pad(pred), pad(x_std), pad(x)
    mask2 = torch.arange(T + 5)[None, :] < lengths[:, None]
    for t in (pred2, x_std2, x2):
        t[:, :T][~mask] = torch.randn(int((~mask).sum()), D) * 100
    torch.testing.assert_close(next_step_loss(pred2, x_std2, mask2, x2, groups, 0.7), base)


@pytest.mark.parametrize("spec, fragment", [
    (["0:3", "2:5"], "0:3 and 2:5 overlap"),
    (["20:40"], "outside the vectors' 28 fields"),
    (["3:3"], "needs 0 <= START and END >= START + 2"),
    (["a:b"], "expects START:END"),
])
def test_a_bad_categorical_range_is_one_line(tmp_path, capsys, spec, fragment):
    flags = [arg for s in spec for arg in ("--categorical", s)]
    code = main(["fit", "--synthetic", "8,10", "--out", str(tmp_path / "r"), "--d-model", "16", "--heads", "2",
                 "--layers", "1", "--ff", "16", "--max-steps", "1", "--num-workers", "0", "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()


@pytest.fixture(scope="module")
def classed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("classed")
    ckpt = train_tiny(root, "classed", classed=True, categorical=["0:3"], categorical_weight=2.0, max_steps=20)
    data = root / "eval-data"
    seqs = classed_sequences(9, seed=5, longest=16)  # within the context: no windows
    write_dataset(data, seqs)
    return ckpt, data, seqs


def test_the_groups_are_recorded_and_eval_reports_top1_per_group(classed_run, capsys):
    ckpt, data, seqs = classed_run
    config = json.loads((ckpt.parent.parent / "config.json").read_text())
    assert config["model"]["categorical"] == ["0:3"] and config["model"]["categorical_weight"] == 2.0
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    (group,) = report["categorical"]
    assert group["fields"] == list(CLASS_FIELDS)
    # reference: argmax of the model's logits for every target, each sequence alone (all within the context)
    import streamtrain

    model, standardizer, _ = streamtrain.load_model(ckpt)
    hits = prev_hits = total = 0
    for s in seqs:
        x = torch.from_numpy(((s - standardizer.mean) / standardizer.std).astype(np.float32))[None]
        with torch.no_grad():
            logits = model(x)[0, :-1, 0:3].numpy()
        truth = s[1:, 0:3].argmax(1)
        hits += int((logits.argmax(1) == truth).sum())
        prev_hits += int((s[:-1, 0:3].argmax(1) == truth).sum())
        total += len(truth)
    assert group["accuracy"] == pytest.approx(hits / total, abs=1e-12)
    assert group["previous_accuracy"] == pytest.approx(prev_hits / total, abs=1e-12)


def test_predict_gives_class_probabilities_for_the_group(classed_run, tmp_path):
    ckpt, data, seqs = classed_run
    out = tmp_path / "p.arrow"
    assert main(["predict", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    with pa.memory_map(str(out)) as f:
        table = pa.ipc.open_file(f).read_all()
    import streamtrain

    model, standardizer, _ = streamtrain.load_model(ckpt)
    for seq_id, rows in zip(table.column("id").to_pylist(), table.column("prediction").to_pylist()):
        got = np.asarray(rows, np.float64)
        s = seqs[seq_id]
        x = torch.from_numpy(((s - standardizer.mean) / standardizer.std).astype(np.float32))[None]
        with torch.no_grad():
            logits = model(x)[0, :, 0:3].double().numpy()
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        np.testing.assert_allclose(got[:, 0:3], probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[:, 0:3].sum(1), 1.0, rtol=1e-5)
