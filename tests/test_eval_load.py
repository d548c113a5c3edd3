"""load_model: a checkpoint as a ready model, its standardization and its config; bad checkpoints are one line."""

import numpy as np
import pytest
import torch
from eval_support import DIM, TINY
from eval_support import checkpoint  # noqa: F401 (shared fixtures)

import streamtrain
from streamtrain.cli import main
from streamtrain.errors import UserError


def test_load_model_gives_the_trained_weights_in_eval_mode(checkpoint):
    model, standardizer, config = streamtrain.load_model(checkpoint)
    ckpt = torch.load(checkpoint, weights_only=True)
    assert not model.training
    assert config.model.d_model == TINY["d_model"] and config.model.dim == DIM
    assert config.data.max_len == TINY["max_len"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][name]), name
    std = np.asarray(ckpt["stats"]["std"])
    np.testing.assert_array_equal(standardizer.mean64.numpy(), np.asarray(ckpt["stats"]["mean"]))
    np.testing.assert_array_equal(standardizer.std64.numpy(), np.where(std > 0, std, 1.0))
    assert next(model.parameters()).device.type == "cpu"


def test_load_model_of_a_missing_or_foreign_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        streamtrain.load_model(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt: not a readable streamtrain checkpoint"):
        streamtrain.load_model(junk)


def test_load_model_without_ema_weights_asked_for_them_is_a_user_error(checkpoint):
    with pytest.raises(UserError, match="no EMA weights"):
        streamtrain.load_model(checkpoint, ema=True)


def test_cuda_without_a_device_is_a_user_error(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    with pytest.raises(UserError, match="no CUDA device"):
        streamtrain.load_model(checkpoint, device="cuda")
