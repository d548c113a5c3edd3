"""CausalTransformer: shapes, causality, padding invariance of outputs and gradients, FLOPs count."""

import pytest
import torch

from streamtrain.model import ModelConfig
from streamtrain.model.transformer import CausalTransformer, sinusoidal_positions
from streamtrain.train.trainer import masked_sq_error


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=5, d_model=32, layers=2, heads=4, ff=64, **kw)
    return CausalTransformer(cfg).eval()


def test_output_shape_and_param_count():
    model = _model()
    x = torch.randn(3, 16, 5)
    assert model(x).shape == (3, 16, 5)
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_future_vectors_do_not_change_past_outputs(deterministic_rng):
    model = _model()
    x = torch.randn(2, 24, 5)
    y = model(x)
    x2 = x.clone()
    x2[:, 13:] = torch.randn(2, 11, 5) * 10
    y2 = model(x2)
    torch.testing.assert_close(y2[:, :13], y[:, :13], rtol=0, atol=1e-6)
    assert not torch.allclose(y2[:, 13:], y[:, 13:])


@pytest.mark.parametrize("input_norm", [False, True])
def test_padding_contents_and_extra_padding_leave_outputs_and_gradients_unchanged(deterministic_rng, input_norm):
    model = _model(input_norm=input_norm)
    lengths = torch.tensor([7, 16, 3])
    base = torch.randn(3, 16, 5)
    mask = torch.arange(16)[None, :] < lengths[:, None]

    def run(T, pad_value):
        x = torch.zeros(3, T, 5)
        x[:, :16] = base
        m = torch.zeros(3, T, dtype=torch.bool)
        m[:, :16] = mask
        pads = ~m
        x[pads] = pad_value[: int(pads.sum())]
        model.zero_grad()
        out = model(x)
        masked_sq_error(out, x, m).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return out[:, :16][mask], grads

    junk = torch.randn(1000, 5) * 100
    out_a, grads_a = run(16, torch.zeros(1000, 5))
    out_b, grads_b = run(40, junk)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_sinusoidal_positions_match_the_formula():
    pe = sinusoidal_positions(10, 6)
    assert pe.shape == (10, 6)
    t, i = 7, 2
    assert pe[t, 2 * i].item() == pytest.approx(torch.sin(torch.tensor(t / 10000 ** (2 * i / 6))).item(), abs=1e-6)
    assert pe[t, 2 * i + 1].item() == pytest.approx(torch.cos(torch.tensor(t / 10000 ** (2 * i / 6))).item(), abs=1e-6)


@pytest.mark.parametrize("input_norm", [False, True])
def test_train_flops_match_the_matmuls_torch_counts_in_a_forward_and_backward(deterministic_rng, input_norm):
    """The reference: torch.utils.flop_counter.FlopCounterMode over a real forward + backward of rows of
    full length T, with attention on SDPA's math backend, whose matmuls the counter sees (it has no
    formula for the CPU flash kernel, which it would count as 0).

    What each side counts, 2 FLOPs per multiply-add:
    - the counter, matmuls only: a Linear's forward 2 in out per token and backward 4 in out (input and
      weight gradients), but 2 in out for the embedding when nothing before it needs a gradient (no
      --input-norm, whose gains would need the embedding's input gradient); attention's QK^T
      and AV over the whole T x T matrix (the math backend masks after computing it): 4 T C per token
      and layer forward, 8 T C backward. Bias adds, LayerNorm, softmax, GELU and the loss are no matmuls.
    - PaLM (train_flops): 6 per parameter, biases and LayerNorm gains included, + 12 L C T per token.
    So train_flops - counted = tokens (6 (parameters outside Linear weights) + [2 D C]), exactly: both
    sides are integer counts far below 2**53, so no tolerance is needed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(input_norm=input_norm).train()
    B, T, D, C, L = 3, 16, 5, 32, 2
    x = torch.randn(B, T, D)
    mask = torch.ones(B, T, dtype=torch.bool)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        masked_sq_error(model(x), x, mask).backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert by_op["aten.bmm"] == 12 * L * C * T * (B * T)  # the attention term, on its own

    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    others = model.num_params() - linear_weights  # biases, LayerNorm gains and biases
    assert others > 0
    lengths = torch.full((B,), T)
    skipped_input_grad = 0 if input_norm else 2 * D * C
    assert model.train_flops(lengths) - counter.get_total_flops() == B * T * (6 * others + skipped_input_grad)
    assert model.train_flops(lengths) == B * T * model.flops_per_token(T)


def test_train_flops_sums_flops_per_token_over_each_rows_length():
    model = _model()
    lengths = torch.tensor([1, 7, 30, 113])
    assert model.train_flops(lengths) == sum(int(l) * model.flops_per_token(int(l)) for l in lengths)
    assert model.train_flops(torch.zeros(0, dtype=torch.int64)) == 0


def _encoding_added(model, x, offsets=None):
    """The input of the first block's dropout: embedding + positional encoding, (B, T, C)."""
    seen = {}
    handle = model.drop.register_forward_hook(lambda module, args, out: seen.setdefault("h", args[0]))
    try:
        model(x, offsets) if offsets is not None else model(x)
    finally:
        handle.remove()
    return seen["h"]


def test_offsets_shift_each_rows_positions(deterministic_rng):
    model = _model()
    x = torch.randn(3, 12, 5)
    offsets = torch.tensor([0, 39, 117])
    h = _encoding_added(model, x, offsets)
    embedded = model.embed(x)
    for b, k in enumerate(offsets.tolist()):
        expected = embedded[b] + sinusoidal_positions(k + 12, 32)[k:]
        torch.testing.assert_close(h[b], expected, rtol=1e-5, atol=1e-5)
    # all-zero offsets and no offsets are the same model
    torch.testing.assert_close(model(x, torch.zeros(3, dtype=torch.int64)), model(x), rtol=0, atol=1e-6)
    assert not torch.allclose(model(x, offsets)[1:], model(x)[1:])
    assert torch.equal(sinusoidal_positions(5, 32, start=39), sinusoidal_positions(44, 32)[39:])


def test_state_dict_names_have_no_wrapper_prefix():
    names = list(_model().state_dict())
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in names)
    assert "embed.weight" in names and "head.weight" in names
