"""`streamtrain export`: the exported program against the eager model at shapes it was not traced at, class
groups as probabilities, and what needs a missing package as one line."""

import importlib.util

import numpy as np
import pytest
import torch
from eval_support import DIM, train_tiny, write_varied
from eval_support import checkpoint  # noqa: F401 (shared fixtures)

import streamtrain
from streamtrain.cli import main


def _eager(checkpoint, x):
    """The checkpoint's predictions for x (original units), by hand: standardize, forward, un-standardize."""
    model, standardizer, _ = streamtrain.load_model(checkpoint)
    x_std = (x.double() - standardizer.mean64) / standardizer.std64
    with torch.no_grad():
        pred = model(x_std.float()).double()
    return pred * standardizer.std64 + standardizer.mean64, pred


def test_exported_program_matches_eager_at_any_batch_size_and_length(tmp_path, checkpoint, capsys):
    root, _ = write_varied(tmp_path / "data")
    out = tmp_path / "model.pt2"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--data", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "largest |exported - eager| over" in printed and f"batches of {root}" in printed
    program = torch.export.load(str(out)).module()
    gen = torch.Generator().manual_seed(3)
    for B, T in ((1, 2), (3, 37), (5, 11)):
        x = torch.randn(B, T, DIM, generator=gen) * 2 + 1
        ref, _ = _eager(checkpoint, x)
        torch.testing.assert_close(program(x).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_exported_class_groups_are_probabilities(tmp_path):
    ckpt = train_tiny(tmp_path, "classed", classed=True, categorical=["0:3"], categorical_weight=2.0, max_steps=20)
    out = tmp_path / "m.pt2"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    x = torch.rand(2, 9, DIM)
    with torch.no_grad():
        got = torch.export.load(str(out)).module()(x).double()
    ref, logits = _eager(ckpt, x)
    torch.testing.assert_close(got[..., 0:3], torch.softmax(logits[..., 0:3], -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[..., 3:], ref[..., 3:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[..., 0:3].sum(-1).numpy(), 1.0, rtol=1e-5)


def test_onnx_without_the_onnx_package_is_one_line(tmp_path, checkpoint, capsys):
    if importlib.util.find_spec("onnx") is not None:
        pytest.skip("the onnx package is installed here")
    code = main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "needs the onnx package" in err
    assert not (tmp_path / "m.onnx").exists()


def test_an_unknown_export_format_is_one_line(tmp_path, checkpoint, capsys):
    code = main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.bin")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "must end in .pt2" in err
