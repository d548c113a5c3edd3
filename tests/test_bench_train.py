"""The train benchmark's ablation compares like with like: the seed's model and fit's have the same size,
each variant changes only its own part, and a step reports the real tokens of the batch it trained on."""

import numpy as np
import pytest
import torch
from conftest import write_dataset

from streamtrain.bench.train_bench import (
    VARIANTS,
    AblationPipeline,
    ModelShape,
    SeedModel,
    load_sequences,
)
from streamtrain.model.config import ModelConfig
from streamtrain.model.transformer import CausalTransformer


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    sequences = [rng.standard_normal((int(n), 6)).astype(np.float32) for n in rng.integers(2, 60, size=37)]
    write_dataset(tmp_path / "ds", sequences)
    return tmp_path / "ds", sequences


def test_seed_and_fit_models_have_the_same_parameters():
    shape = ModelShape(32, 2, 4, 64)
    seed = SeedModel(6, shape)
    fit = CausalTransformer(ModelConfig(dim=6, d_model=32, layers=2, heads=4, ff=64))
    assert sum(p.numel() for p in seed.parameters()) == fit.num_params()


def test_model_shape_parsing():
    assert ModelShape.parse("128x4x512") == ModelShape(128, 4, 4, 512)
    assert ModelShape.parse("6x1x8") == ModelShape(6, 1, 2, 8)  # 4 heads do not divide 6
    assert ModelShape.parse("64x2x128x8") == ModelShape(64, 2, 8, 128)


def test_variants_change_one_thing_each():
    base = VARIANTS[0]
    for v in VARIANTS[1:4]:
        changed = [f for f in ("batches", "model", "optimizer") if getattr(v, f) != getattr(base, f)]
        assert len(changed) == 1, v.name
    assert {VARIANTS[4].batches, VARIANTS[4].model, VARIANTS[4].optimizer} == {"bucketed", "sdpa", "fused"}


def test_load_sequences_cuts_at_max_len(dataset):
    root, sequences = dataset
    loaded = load_sequences(root, 20)
    assert len(loaded) == len(sequences)
    for got, want in zip(loaded, sequences):
        np.testing.assert_array_equal(got.numpy(), want[:20])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_each_variant_trains_and_counts_real_tokens(dataset, variant):
    root, sequences = dataset
    shape = ModelShape(16, 1, 2, 32)
    pipe = AblationPipeline(variant, root, load_sequences(root, 64), shape, batch_tokens=64, device=torch.device("cpu"))
    before = [p.detach().clone() for p in pipe.model.parameters()]
    real, flops = pipe.step()
    lengths = np.array([len(s) for s in sequences])
    assert 2 <= real <= (16 * lengths.max() if variant.batches == "random" else 64)
    assert flops > 6 * pipe.flops_model.num_params() * real - 1  # PaLM: at least 6 N per real token
    assert any(not torch.equal(a, b) for a, b in zip(before, pipe.model.parameters()))  # it took a step
    opt = pipe.optimizer.defaults
    if variant.optimizer == "plain":
        assert opt["foreach"] is False and not opt.get("fused")
    else:
        assert opt.get("fused") or opt["foreach"]
    assert isinstance(pipe.model, SeedModel) == (variant.model == "encoder")
