"""Trainer: the loss against a float64 reference, accumulation, exact resume, overfitting, mixed-precision steps."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import write_dataset

from streamtrain.train.checkpoint import load_checkpoint
from streamtrain.train.config import resolve_config
from streamtrain.train.dataprep import prepare_data
from streamtrain.train.run import run_fit
from streamtrain.train.trainer import Trainer, valid_target_count

TINY = {"d_model": 32, "layers": 2, "heads": 4, "ff": 64, "num_workers": 0, "quiet": True, "log_every": 1}


def _sequences(n, dim=5, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        T = int(rng.integers(1, max_len))
        t = np.arange(T)[:, None]
        phase = rng.uniform(0, 6, size=dim)
        seq = np.sin(0.3 * t + phase) * rng.uniform(0.5, 2, size=dim) + rng.normal(3, 1, size=dim)
        seq[:, 0] = 4.0  # a zero-variance dimension passes through standardization (std -> 1)
        out.append(seq.astype(np.float32))
    return out


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, _sequences(37), shard_bytes=1500)  # several shards
    return root


def _trainer(tmp_path, data, **flags):
    values = {**TINY, "data": str(data), "out": str(tmp_path / "run"), "max_steps": 5, **flags}
    cfg = resolve_config(values)
    prepared = prepare_data(cfg, tmp_path / "run", is_main=True)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=prepared.index.dim))
    return Trainer(cfg, prepared, tmp_path / "run", torch.device("cpu"))


def test_step_loss_equals_a_float64_reference_over_two_micro_batches(tmp_path, dataset):
    trainer = _trainer(tmp_path, dataset, batch_tokens=128, grad_accum=2)
    group = []
    it = iter(trainer.loader)
    group = [next(it), next(it)]
    assert group[0].x.shape[1] != group[1].x.shape[1] or len(group[0]) != len(group[1])
    loss = float(trainer.accumulate_gradients(group))

    model64 = trainer.model.double().eval()
    mean, std = trainer.mean, trainer.std
    assert std[0] == 1.0  # the constant dimension
    total_sq, total_count = 0.0, 0
    for b in group:
        x = b.x.double().numpy()
        lengths = b.lengths.numpy()
        x_std = (x - mean) / std
        for i, n in enumerate(lengths):
            x_std[i, n:] = 0.0
        with torch.no_grad():
            pred = model64(torch.from_numpy(x_std)).numpy()
        for i, n in enumerate(lengths):
            if n > 1:
                total_sq += float(((pred[i, : n - 1] - x_std[i, 1:n]) ** 2).sum())
                total_count += (n - 1) * x.shape[2]
    assert total_count == sum(valid_target_count(b.lengths, 5) for b in group)
    assert loss == pytest.approx(total_sq / total_count, rel=1e-5)


def test_accumulated_gradients_equal_one_big_batch(tmp_path, dataset):
    trainer = _trainer(tmp_path, dataset, batch_tokens=128)
    it = iter(trainer.loader)
    a, b = next(it), next(it)
    trainer.accumulate_gradients([a, b])
    grads_accum = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.optimizer.zero_grad(set_to_none=True)

    T = max(a.x.shape[1], b.x.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, T - t.shape[1])) if t.dim() == 3 else torch.nn.functional.pad(t, (0, T - t.shape[1]))  # noqa: E731
    merged = dataclasses.replace(
        a,
        x=torch.cat([pad(a.x), pad(b.x)]),
        mask=torch.cat([pad(a.mask), pad(b.mask)]),
        lengths=torch.cat([a.lengths, b.lengths]),
        ids=torch.cat([a.ids, b.ids]),
        offsets=torch.cat([a.offsets, b.offsets]),
    )
    trainer.accumulate_gradients([merged])
    for g_acc, p in zip(grads_accum, trainer.model.parameters()):
        torch.testing.assert_close(p.grad, g_acc, rtol=1e-4, atol=1e-7)


def _params_and_optimizer(path):
    ckpt = load_checkpoint(path)
    return ckpt["model"], ckpt["optimizer"]["state"], ckpt


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, dataset):
    common = {**TINY, "data": str(dataset), "batch_tokens": 96, "grad_accum": 2, "dropout": 0.1, "lr": 3e-3}
    # the data holds 8 steps per epoch: 20 steps cross two epoch boundaries, and the resume point is mid-epoch
    assert run_fit({**common, "out": str(tmp_path / "a"), "max_steps": 20}) == 0
    assert run_fit({**common, "out": str(tmp_path / "b"), "max_steps": 10, "decay_steps": 20}) == 0
    assert run_fit({"out": str(tmp_path / "b"), "max_steps": 20, "quiet": True}, resume=True) == 0

    model_a, opt_a, ckpt_a = _params_and_optimizer(tmp_path / "a/checkpoints/last.pt")
    model_b, opt_b, ckpt_b = _params_and_optimizer(tmp_path / "b/checkpoints/last.pt")
    assert ckpt_a["step"] == ckpt_b["step"] == 20
    assert ckpt_a["loader"] == ckpt_b["loader"]
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    for key in opt_a:
        for field in opt_a[key]:
            assert torch.equal(torch.as_tensor(opt_a[key][field]), torch.as_tensor(opt_b[key][field]))
    # metrics.jsonl of the resumed run holds each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_resume_with_another_model_config_is_a_user_error(tmp_path, dataset):
    from streamtrain.errors import UserError

    assert run_fit({**TINY, "data": str(dataset), "out": str(tmp_path / "r"), "max_steps": 2}) == 0
    with pytest.raises(UserError, match="--d-model 64"):
        run_fit({"out": str(tmp_path / "r"), "d_model": 64, "max_steps": 4}, resume=True)


def test_overfits_a_handful_of_sequences(tmp_path):
    root = tmp_path / "few"
    write_dataset(root, _sequences(5, seed=3, max_len=24))
    flags = {**TINY, "data": str(root), "out": str(tmp_path / "run"), "max_steps": 300, "lr": 3e-3,
             "warmup_steps": 20, "weight_decay": 0.0, "batch_tokens": 256}
    assert run_fit(flags) == 0
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] / 10


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, dataset):
    from streamtrain.train.trainer import TrainingDiverged

    out = tmp_path / "nan"
    assert run_fit({**TINY, "data": str(dataset), "out": str(out), "max_steps": 3}) == 0
    # an absurd learning rate drives the weights to Inf/NaN within a few steps
    with pytest.raises(TrainingDiverged, match="last good weights"):
        run_fit({"out": str(out), "max_steps": 200, "lr": 1e30, "clip": 0.0, "save_every": 1, "quiet": True}, resume=True)
    after = load_checkpoint(out / "checkpoints/last.pt")
    assert after["step"] >= 3
    assert all(torch.isfinite(t).all() for t in after["model"].values())


def test_trainer_keeps_the_warmup_it_derives_out_of_its_config(tmp_path, dataset):
    trainer = _trainer(tmp_path, dataset, max_steps=40)
    assert trainer.cfg.optim.warmup_steps is None and trainer.warmup_steps == 4
    assert trainer._checkpoint()["scheduler"]["warmup_steps"] == 4
    assert trainer._checkpoint()["config"]["optim"]["warmup_steps"] is None


def _long_sequences(n, seed=1, dim=3, max_len=600):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(int(T), dim)).astype(np.float32) for T in rng.integers(2, max_len, size=n)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing torch._dynamo warns about torch.jit
def test_compile_keeps_the_training_plan_to_max_shapes_lengths(tmp_path, monkeypatch):
    import torch._dynamo

    from streamtrain.train.config import COMPILE_MAX_SHAPES
    from streamtrain.train.trainer import plan_shapes

    for name in ("recompile_limit", "accumulated_recompile_limit"):  # restored after the test
        monkeypatch.setattr(torch._dynamo.config, name, getattr(torch._dynamo.config, name))
    root = tmp_path / "long"
    write_dataset(root, _long_sequences(117))
    lengths = lambda trainer, epoch: {T for _, T in plan_shapes(trainer.train_stream, epoch)}  # noqa: E731

    eager = _trainer(tmp_path, root, batch_tokens=1024)
    assert len(lengths(eager, 0)) > COMPILE_MAX_SHAPES  # the default would recompile past torch's limit
    compiled = _trainer(tmp_path, root, batch_tokens=1024, compile=True)
    for epoch in (0, 1):
        assert len(lengths(compiled, epoch)) <= COMPILE_MAX_SHAPES
    assert torch._dynamo.config.recompile_limit >= 2 * len(lengths(compiled, 0))
    assert f"{len(lengths(compiled, 0))} padded lengths T" in compiled._compile_note
    assert len(lengths(_trainer(tmp_path, root, batch_tokens=1024, compile=True, max_shapes=4), 0)) <= 4


def test_windows_of_long_sequences_reach_the_model_with_their_offsets(tmp_path, monkeypatch):
    root = tmp_path / "long"
    write_dataset(root, _long_sequences(13, max_len=100))
    trainer = _trainer(tmp_path, root, batch_tokens=64, max_len=40, val_fraction=0.3)
    seen = []
    forward = trainer.model.forward

    def spy(x, offsets=None):
        seen.append(None if offsets is None else offsets.clone())
        return forward(x, offsets)

    monkeypatch.setattr(trainer.model, "forward", spy)
    batches = list(trainer.loader)
    for batch in batches:
        trainer.accumulate_gradients([batch])
    assert any(bool(b.offsets.any()) for b in batches)
    for batch, offsets in zip(batches, seen):
        if batch.offsets.any():
            assert torch.equal(offsets, batch.offsets)
        else:
            assert offsets is None  # the model's cached positions
    seen.clear()
    trainer.validate()
    assert any(o is not None and bool(o.any()) for o in seen)


def test_batch_caps_the_sequences_per_micro_batch(tmp_path, dataset):
    sizes = [len(b) for b in _trainer(tmp_path, dataset, batch=3).loader]
    assert max(sizes) == 3 and sum(sizes) == 37


def test_max_len_longer_than_a_batch_names_the_flags(tmp_path, dataset):
    from streamtrain.errors import UserError

    with pytest.raises(UserError) as e:
        _trainer(tmp_path, dataset, batch_tokens=4096, max_len=9000)
    message = str(e.value)
    assert "--max-len 9000" in message and "--batch-tokens 4096" in message and "4096 vectors" in message
    assert "max_len=" not in message and "pad_multiple" not in message


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process_accumulating_two_micro_batches(tmp_path, dataset):
    """Rank r of 2 takes the epoch's batches r, r+2, ...; one process with --grad-accum 2 takes them in pairs:
    the same batches per step and a globally normalized loss, so the weights, the logged loss and token
    counts agree; validation (split over the ranks) gives the same MSE; MFU divides by both devices' peak."""
    import os
    import subprocess
    import sys

    args = ["--data", str(dataset), "--d-model", "32", "--layers", "2", "--heads", "4", "--ff", "64",
            "--num-workers", "0", "--batch-tokens", "96", "--max-steps", "3", "--quiet", "--device", "cpu",
            "--log-every", "1", "--val-fraction", "0.15", "--eval-every", "2", "--peak-tflops", "1"]
    # an odd number of validation batches: two ranks splitting them would have to repeat one
    from streamtrain.data import ShardStream
    from streamtrain.data.bucketing import split_ids

    assert ShardStream(str(dataset), max_tokens=96, shuffle=False, ids=split_ids(37, 0.15)[1]).num_batches() % 2 == 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "streamtrain", "fit", *args, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert run_fit({**TINY, "data": str(dataset), "batch_tokens": 96, "max_steps": 3, "grad_accum": 2,
                    "val_fraction": 0.15, "eval_every": 2, "peak_tflops": 1.0, "out": str(tmp_path / "one")}) == 0
    a = load_checkpoint(tmp_path / "ddp/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "one/checkpoints/last.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)

    ddp_records = [json.loads(line) for line in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    one_records = [json.loads(line) for line in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ddp_records] == [r["step"] for r in one_records] == [1, 2, 3]
    for r_ddp, r_one in zip(ddp_records, one_records):
        assert r_ddp["loss"] == pytest.approx(r_one["loss"], rel=1e-4)
        assert r_ddp["real_tokens"] == r_one["real_tokens"] > 0  # both ranks' tokens
        # mfu / real_tokens_per_s = flops / (real_tokens * peak): the interval's clock cancels out
        ratio = lambda r: r["mfu"] / r["real_tokens_per_s"]  # noqa: E731
        assert ratio(r_ddp) == pytest.approx(ratio(r_one) / 2, rel=1e-9)
    val_steps = [r["step"] for r in ddp_records if "val_mse" in r]
    assert val_steps == [r["step"] for r in one_records if "val_mse" in r] == [2, 3]
    for r_ddp, r_one in zip(ddp_records, one_records):
        if "val_mse" in r_ddp:
            assert r_ddp["val_mse"] == pytest.approx(r_one["val_mse"], rel=1e-5)


def test_max_seconds_stops_early_with_a_checkpoint_and_validation(tmp_path, dataset):
    out = tmp_path / "timed"
    flags = {**TINY, "data": str(dataset), "out": str(out), "max_steps": 500, "max_seconds": 1e-6,
             "val_fraction": 0.2, "save_every": 0}
    assert run_fit(flags) == 0
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 1  # stopped at the first step boundary after the limit
    assert (out / "checkpoints" / "best.pt").is_file()  # the final validation ran
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1 and "val_mse" in records[-1]


def test_time_horizon_is_re_estimated_from_the_mean_step_time(tmp_path, dataset, monkeypatch):
    import streamtrain.train.trainer as train_module

    trainer = _trainer(tmp_path, dataset, max_steps=10_000, max_seconds=100.0)
    trainer._print = lambda line: None
    now = {"t": 0.0}
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: now["t"])
    # a slow start: 20 steps in 10 s (0.5 s/step) -> the cosine would end at 20 + 90 / 0.5 = 200
    trainer.step, now["t"] = 20, 10.0
    trainer._set_horizon_from_time(0.0, first=True)
    assert trainer.decay_steps == 200
    warmup = trainer.warmup_steps
    # then faster: 120 steps in 30 s (0.25 s/step) -> 120 + 70 / 0.25 = 400
    trainer.step, now["t"] = 120, 30.0
    trainer._set_horizon_from_time(0.0, first=False)
    assert trainer.decay_steps == 400
    assert trainer.warmup_steps == warmup  # warmup is fixed by the first estimate only
    # never beyond the step/epoch limit
    trainer.step, now["t"] = 9_000, 30.0  # 9000 + 70 / (30 / 9000) = 30000 steps would fit
    trainer._set_horizon_from_time(0.0, first=False)
    assert trainer.decay_steps == 10_000


def test_fit_with_max_seconds_shows_time_progress(tmp_path, dataset):
    import io

    out = io.StringIO()
    flags = {**TINY, "quiet": False, "data": str(dataset), "out": str(tmp_path / "run"), "max_steps": 3,
             "max_seconds": 3600.0}
    assert run_fit(flags, stream=out) == 0
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1", "step 2", "step 3"]
    assert all(" of 1h00m (" in line and "| ETA " in line for line in lines)


def _poison_steps(monkeypatch, steps):
    """Make the training loss NaN (and with it every gradient) at the given 1-based optimizer steps: with
    --grad-accum 1 the loss is computed once per step."""
    import streamtrain.train.step as step_module

    real = step_module.masked_sq_error
    calls = {"n": 0}

    def poisoned(pred, x_std, mask):
        calls["n"] += 1
        loss = real(pred, x_std, mask)
        return loss * float("nan") if calls["n"] in steps else loss

    monkeypatch.setattr(step_module, "masked_sq_error", poisoned)


def _adam_updates(ckpt):
    return {int(state["step"]) for state in ckpt["optimizer"]["state"].values()}


def test_nonfinite_stop_exits_3_and_keeps_the_last_good_checkpoint(tmp_path, dataset, monkeypatch, capsys):
    from streamtrain.cli import main
    from streamtrain.train.trainer import EXIT_DIVERGED

    _poison_steps(monkeypatch, set(range(3, 100)))
    out = tmp_path / "stop"
    code = main(["fit", "--data", str(dataset), "--out", str(out), "--d-model", "32", "--layers", "2", "--heads", "4",
                 "--ff", "64", "--num-workers", "0", "--quiet", "--max-steps", "10", "--save-every", "1",
                 "--log-every", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_DIVERGED == 3
    assert len(err) == 1 and "training loss became nan by step 3" in err[0] and "last good weights" in err[0]
    ckpt = load_checkpoint(out / "checkpoints/last.pt")
    assert ckpt["step"] == 2 and _adam_updates(ckpt) == {2}
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nonfinite_skip_drops_the_update_and_counts_it(tmp_path, dataset, monkeypatch, capsys, precision):
    _poison_steps(monkeypatch, {3, 4})
    out = tmp_path / "skip"
    flags = {**TINY, "quiet": False, "data": str(dataset), "out": str(out), "max_steps": 8, "save_every": 1,
             "nonfinite": "skip", "precision": precision}
    assert run_fit(flags) == 0
    ckpt = load_checkpoint(out / "checkpoints/last.pt")
    assert ckpt["step"] == 8 and ckpt["skipped_steps"] == 2
    assert _adam_updates(ckpt) == {6}  # two of the eight updates were dropped
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    if precision == "fp16":  # the GradScaler saw the NaN gradients and backed off at each of the two steps
        assert ckpt["scaler"]["scale"] == 2.0**16 / 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert [r["loss"] is None for r in records] == [False, False, True, True, False, False, False, False]
    printed = capsys.readouterr().out
    assert "step 3: NaN/Inf loss, update skipped" in printed
    assert "done: 8 steps | final loss " in printed and "| 2 non-finite steps skipped" in printed


def test_nonfinite_skip_stops_after_the_limit_of_consecutive_steps(tmp_path, dataset, monkeypatch, capsys):
    from streamtrain.cli import main

    common = ["fit", "--data", str(dataset), "--d-model", "32", "--layers", "2", "--heads", "4", "--ff", "64",
              "--num-workers", "0", "--quiet", "--save-every", "1", "--decay-steps", "20"]
    assert main([*common, "--out", str(tmp_path / "two"), "--max-steps", "2"]) == 0
    good = load_checkpoint(tmp_path / "two/checkpoints/last.pt")["model"]

    _poison_steps(monkeypatch, set(range(3, 100)))
    out = tmp_path / "skip"
    code = main([*common, "--out", str(out), "--max-steps", "20", "--nonfinite", "skip", "--nonfinite-limit", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1
    assert "NaN/Inf for 3 consecutive steps (steps 3 to 5" in err[0] and "last good weights" in err[0]
    ckpt = load_checkpoint(out / "checkpoints/last.pt")
    assert ckpt["step"] == 4 and ckpt["skipped_steps"] == 2  # saved after the skipped steps 3 and 4
    for name, weights in ckpt["model"].items():  # which left the weights of step 2 untouched
        assert torch.equal(weights, good[name]), name


# ---------------------------------------------------------------------------------------------------------
# Mixed precision trains: one real step (forward, masked loss, backward, unscale, clip, AdamW) through
# Trainer._train_step, in bf16 autocast and in fp16 autocast + GradScaler on CPU, against the same step in fp32


def _step_in(tmp_path, dataset, precision):
    """Run the first optimizer step of a Trainer in `precision`; return (loss, grad_norm, gradients the
    backward left (scaled ones for fp16), gradients the optimizer used, weights before, weights after)."""
    trainer = _trainer(tmp_path / precision, dataset, precision=precision, batch_tokens=256, clip=0.0)
    params = list(trainer.model.parameters())
    before = [p.detach().clone() for p in params]
    seen = {}
    scaler, optimizer = trainer.precision.scaler, trainer.optimizer
    unscale, step = scaler.unscale_, optimizer.step

    def spy_unscale(opt):
        seen["backward"] = [p.grad.clone() for p in params]
        return unscale(opt)

    def spy_step(*args, **kwargs):
        seen["used"] = [p.grad.clone() for p in params]
        return step(*args, **kwargs)

    scaler.unscale_, optimizer.step = spy_unscale, spy_step
    group = [next(iter(trainer.loader))]
    loss, grad_norm, _ = trainer._train_step(group)
    after = [p.detach().clone() for p in params]
    return float(loss), float(grad_norm), seen["backward"], seen["used"], before, after, trainer


def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def _rel(a, b):
    return float((_flat(a) - _flat(b)).norm() / _flat(b).norm())


@pytest.mark.parametrize(
    "precision, loss_rel, grad_rel",
    # bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4%), fp16 11 (2^-11 = 0.05%). Autocast rounds
    # the inputs of every matmul; the loss is summed in fp32, so it carries about one rounding (measured
    # 3e-4 and 1e-5). A gradient passes some 2 L + 2 = 6 matmuls in series whose rounding errors add in
    # quadrature: ~sqrt(6) * 2^-9 = 0.5% for bf16, 0.06% for fp16 (measured 0.4% and 0.04%). Tolerances:
    # about 8x those estimates, far below what a missing or doubled loss scale would give (65536x).
    [("bf16", 5e-3, 3e-2), ("fp16", 1e-3, 5e-3)],
)
def test_a_mixed_precision_step_matches_the_fp32_step(tmp_path, dataset, precision, loss_rel, grad_rel):
    """The weights after the step are compared as updates: AdamW's first update is lr * g / (|g| + eps),
    about lr * sign(g) per weight, so it is blind to a gradient's scale (which the gradient checks see)
    and flips by 2 lr where a rounding flips the sign of a near-zero gradient component; a step that was
    skipped (an fp16 overflow) or updated the wrong weights would be off by the whole update."""
    loss32, norm32, grads32, used32, before32, after32, _ = _step_in(tmp_path, dataset, "fp32")
    loss, norm, grads, used, before, after, trainer = _step_in(tmp_path, dataset, precision)
    for a, b in zip(before, before32):
        assert torch.equal(a, b)  # the same initial weights: the same --seed
    assert loss == pytest.approx(loss32, rel=loss_rel)
    assert norm == pytest.approx(norm32, rel=grad_rel)  # the norm of the unscaled gradients
    assert _rel(used, used32) < grad_rel  # what AdamW consumed: unscaled, not 65536x off
    scale = trainer.precision.scaler.get_scale() if precision == "fp16" else 1.0
    assert scale == (2.0**16 if precision == "fp16" else 1.0)  # the default initial scale, no overflow
    assert _rel([g / scale for g in grads], grads32) < grad_rel  # backward ran on the scaled loss
    if precision == "fp16":
        assert _rel(grads, grads32) > 1000  # ... really scaled
    update32 = [a - b for a, b in zip(after32, before32)]
    update = [a - b for a, b in zip(after, before)]
    assert float(_flat(update32).abs().max()) > 0
    lr = trainer.optimizer.param_groups[0]["lr"]
    flipped = float(((_flat(update) - _flat(update32)).abs() > lr).float().mean())
    assert flipped < 0.02  # measured 0.2% (bf16), 0.01% (fp16)
    # flips in a share f of the weights move the update by 2 sqrt(f) of its norm: at most 0.28 for f = 2%
    assert _rel(update, update32) < 2 * math.sqrt(0.02)  # measured 0.10 (bf16), 0.02 (fp16)
