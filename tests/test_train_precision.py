"""Precision choice: the CUDA rule, the --amp probe on CPU (shapes, timing, decision, cache), and what a run
records and reuses of it."""

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import write_dataset

import streamtrain.train.precision as amp
from streamtrain.train.checkpoint import load_checkpoint
from streamtrain.train.config import read_config_file, resolve_config
from streamtrain.train.precision import (
    CpuProbe,
    ProbeShape,
    choose_precision,
    decide_cpu_precision,
    probe_shapes,
)
from streamtrain.train.run import run_fit

TINY = {"d_model": 32, "layers": 2, "heads": 4, "ff": 64, "num_workers": 0, "quiet": True, "log_every": 1}


def _probe(precision, ratio=1.2):
    return CpuProbe(precision, ratio, 0.01, 0.05, 3, ((8, 16, 1.0),))


@pytest.mark.parametrize(
    "args, expected",
    [
        (("cuda", True, None, True), "bf16"),
        (("cuda", False, None, True), "fp16"),
        (("cuda", True, None, False), "fp32"),
        (("cpu", False, None, True, _probe("bf16")), "bf16"),
        (("cpu", False, None, True, _probe("fp32", 0.84)), "fp32"),
        (("cpu", False, None, True), "fp32"),  # --amp on a CPU without a measurement
        (("cpu", False, None, False, _probe("bf16")), "fp32"),  # the probe never overrides a run without --amp
        (("cpu", False, "bf16", False), "bf16"),
        (("cuda", True, "fp16", True), "fp16"),
        (("cpu", False, "fp32", True, _probe("bf16")), "fp32"),
        (("cpu", False, "fp16", True), "fp16"),
    ],
)
def test_choose_precision(args, expected):
    name, reason = choose_precision(*args)
    assert name == expected
    assert reason and "\n" not in reason


def test_fp16_enables_the_grad_scaler_and_fp32_does_not():
    cpu = torch.device("cpu")
    p16 = amp.build_precision(cpu, amp=False, forced="fp16")
    assert p16.dtype == torch.float16 and p16.scaler.is_enabled()
    p32 = amp.build_precision(cpu, amp=False, forced=None)
    assert p32.dtype == torch.float32 and not p32.scaler.is_enabled()
    pbf16 = amp.build_precision(cpu, amp=False, forced="bf16")
    assert pbf16.dtype == torch.bfloat16 and not pbf16.scaler.is_enabled()


# ---------------------------------------------------------------------------------------------------------
# The decision, from fake timings


def test_decide_takes_bf16_only_when_faster_by_more_than_the_margin_and_the_noise():
    # quiet rounds: bf16 1.30x faster in every round
    assert decide_cpu_precision([1.3, 1.3, 1.3], [1.0, 1.0, 1.0])[0] == "bf16"
    # bf16 slower: fp32, and the ratio says by how much
    name, ratio, _, _ = decide_cpu_precision([0.84, 0.84, 0.84], [1.0, 1.0, 1.0])
    assert name == "fp32" and ratio == pytest.approx(0.84)
    # faster, but by less than the minimum margin
    name, ratio, noise, margin = decide_cpu_precision([1.03, 1.03, 1.03], [1.0, 1.0, 1.0])
    assert name == "fp32" and noise == 0.0 and margin == amp.MIN_MARGIN
    # the same median speed-up of 1.15x: taken from quiet rounds, not from noisy ones
    assert decide_cpu_precision([1.15, 1.16, 1.14, 1.15, 1.15], [1.0] * 5)[0] == "bf16"
    name, ratio, noise, margin = decide_cpu_precision([0.95, 1.5, 1.15, 0.9, 1.4], [1.0] * 5)
    assert ratio == pytest.approx(1.15) and name == "fp32" and margin > 0.15


def test_decide_noise_is_the_standard_error_of_the_median_ratio():
    # ratios 1.2, 1.3, 1.5: median 1.3, absolute deviations 0.1, 0, 0.2 -> MAD 0.1
    fp32 = [1.2 * 2.0, 1.3 * 0.5, 1.5 * 1.0]  # the machine's speed drifts between rounds: pairs cancel it
    bf16 = [2.0, 0.5, 1.0]
    name, ratio, noise, margin = decide_cpu_precision(fp32, bf16)
    sigma = 1.4826 * 0.1 / 1.3
    assert ratio == pytest.approx(1.3)
    assert noise == pytest.approx(1.2533 * sigma / math.sqrt(3))  # 0.0826
    assert margin == pytest.approx(2 * noise) and name == "bf16"  # 1.3 > 1 + 0.165
    with pytest.raises(ValueError):
        decide_cpu_precision([1.0, 2.0], [1.0])


# ---------------------------------------------------------------------------------------------------------
# Shapes and timing


def test_probe_shapes_represent_equal_token_shares_by_their_most_frequent_shape():
    tokens = {(256, 16): 1000, (128, 32): 1000, (64, 64): 3000, (32, 128): 1000, (8, 512): 2000, (1, 4096): 2000}
    # in order of T the token intervals are [0, .1], [.1, .2], [.2, .5], [.5, .6], [.6, .8], [.8, 1]: thirds
    # {16, 32}, {64, 128}, {512, 4096}; ties go to the shape nearest the middle of the third (1/6, 5/6)
    assert probe_shapes(tokens, 3) == [ProbeShape(64, 64, 0.4), ProbeShape(1, 4096, 0.4), ProbeShape(128, 32, 0.2)]
    # no more shapes than asked for; one shape: all of it
    assert probe_shapes({(4, 8): 32, (2, 16): 32}, 3) == [ProbeShape(4, 8, 0.5), ProbeShape(2, 16, 0.5)]
    assert probe_shapes({(4, 8): 32}, 3) == [ProbeShape(4, 8, 1.0)]
    assert probe_shapes({}, 3) == []
    # a shape holding most of the tokens is one group, however many are asked for
    assert probe_shapes({(64, 64): 9000, (16, 64): 1000}, 3) == [ProbeShape(64, 64, 0.9), ProbeShape(16, 64, 0.1)]


class FakeMachine:
    """run_step and clock of a machine where a step of `precision` at (B, T) takes cost[precision] * B * T
    seconds, the process's first step `first_call_s` more (its one-off set-up)."""

    def __init__(self, cost, first_call_s=0.0):
        self.cost = cost
        self.first_call_s = first_call_s
        self.now = 0.0
        self.calls = []

    def clock(self):
        return self.now

    def run_step(self, precision, shape):
        first = not self.calls
        self.calls.append((precision, (shape.batch, shape.length)))
        self.now += self.cost[precision] * shape.batch * shape.length + (self.first_call_s if first else 0.0)


def test_time_precisions_warms_up_then_alternates_candidates_and_weights_shapes():
    machine = FakeMachine({"fp32": 1e-6, "bf16": 0.5e-6}, first_call_s=5.0)
    shapes = [ProbeShape(8, 16, 0.5), ProbeShape(2, 64, 0.5)]
    costs, timed = amp.time_precisions(machine.run_step, shapes, budget_s=1.0, min_rounds=3, max_rounds=9,
                                       clock=machine.clock)
    assert timed == shapes
    # warm-up: each candidate once per shape; then rounds in alternating order
    assert machine.calls[:4] == [("fp32", (8, 16)), ("bf16", (8, 16)), ("fp32", (2, 64)), ("bf16", (2, 64))]
    rounds = machine.calls[4:]
    assert rounds[:4] == [("fp32", (8, 16)), ("bf16", (8, 16)), ("bf16", (2, 64)), ("fp32", (2, 64))]
    assert rounds[4:8] == [("bf16", (8, 16)), ("fp32", (8, 16)), ("fp32", (2, 64)), ("bf16", (2, 64))]
    # the first call's one-off 5 s spent the budget: exactly the minimum of rounds
    assert len(costs["fp32"]) == len(costs["bf16"]) == 3 and len(rounds) == 3 * 4
    # seconds per padded token
    assert costs["fp32"] == pytest.approx([1e-6] * 3) and costs["bf16"] == pytest.approx([0.5e-6] * 3)


def test_time_precisions_fits_the_shapes_and_rounds_to_the_budget():
    shapes = [ProbeShape(64, 64, 0.5), ProbeShape(16, 256, 0.3), ProbeShape(4, 1024, 0.2)]
    # a fast step (4 ms): every shape, and rounds until the budget is spent or the maximum is reached
    fast = FakeMachine({"fp32": 1e-6, "bf16": 1e-6})
    costs, timed = amp.time_precisions(fast.run_step, shapes, budget_s=10.0, max_rounds=9, clock=fast.clock)
    assert timed == shapes and len(costs["fp32"]) == 9
    costs, _ = amp.time_precisions(fast.run_step, shapes, budget_s=0.2, min_rounds=3, max_rounds=9, clock=fast.clock)
    assert 3 <= len(costs["fp32"]) < 9
    # a slow step (0.4 s): 2.5 s hold the warm-up and 3 rounds of one shape only, the most frequent
    slow = FakeMachine({"fp32": 100e-6, "bf16": 100e-6})
    costs, timed = amp.time_precisions(slow.run_step, shapes, budget_s=2.5, min_rounds=3, clock=slow.clock)
    assert timed == shapes[:1] and len(costs["fp32"]) == 3
    assert {shape for _, shape in slow.calls} == {(64, 64)}


# ---------------------------------------------------------------------------------------------------------
# The probe's cache


def _probe_cpu(machine, model=None, **kw):
    tokens = {(8, 16): 128 * 3, (2, 64): 128}
    return amp.probe_cpu_precision(machine.run_step, tokens, model or {"d_model": 32}, budget_s=0.01,
                                   clock=machine.clock, **kw)


def test_probe_result_is_cached_per_config_and_an_unreadable_cache_means_probing_again(checksum_cache):
    machine = FakeMachine({"fp32": 1e-6, "bf16": 0.5e-6})
    first = _probe_cpu(machine)
    assert first.precision == "bf16" and first.ratio == pytest.approx(2.0) and not first.cached
    assert "measured 2.00x fp32" in first.describe() and "-> bf16" in first.describe()
    files = list((checksum_cache / "precision").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["model"] == {"d_model": 32}
    assert not list((checksum_cache / "precision").glob(".*"))  # no temp file left behind

    calls = len(machine.calls)
    second = _probe_cpu(machine)
    assert len(machine.calls) == calls  # nothing timed
    assert second.cached and second.precision == "bf16" and second.ratio == first.ratio
    assert "cached" in second.describe()

    _probe_cpu(machine, model={"d_model": 64})  # another model: measured again
    assert len(machine.calls) > calls
    assert len(list((checksum_cache / "precision").glob("*.json"))) == 2

    files[0].write_bytes(b"\x00not json")
    calls = len(machine.calls)
    again = _probe_cpu(machine)
    assert len(machine.calls) > calls and not again.cached
    assert json.loads(files[0].read_text())["probe"]["precision"] == "bf16"  # rewritten


def test_probe_cache_key_names_the_machine_torch_threads_model_and_shapes():
    shapes = [ProbeShape(8, 16, 0.75)]
    key = amp.probe_cache_key({"d_model": 32}, shapes, threads=3)
    assert key["device"] == "cpu" and key["torch"] == torch.__version__ and key["threads"] == 3
    assert key["shapes"] == [[8, 16, 0.75]] and key["model"] == {"d_model": 32}
    assert amp.probe_cache_key({"d_model": 32}, shapes, threads=4) != key
    cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512_bf16 avx2\n"
    other = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n"
    assert amp.cpu_identity(cpuinfo)["model"] == "AMD EPYC"
    assert amp.cpu_identity(cpuinfo)["flags_sha256"] != amp.cpu_identity(other)["flags_sha256"]
    # the order of the flags does not matter
    reordered = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: avx2 fpu avx512_bf16\n"
    assert amp.cpu_identity(cpuinfo) == amp.cpu_identity(reordered)


# ---------------------------------------------------------------------------------------------------------
# A run with --amp on CPU


def _sequences(n, dim=5, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    return [rng.normal(3, 1, size=(int(rng.integers(2, max_len)), dim)).astype(np.float32) for _ in range(n)]


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, _sequences(37))
    return root


def _fake_timings(monkeypatch, bf16_speedup):
    """Make the probe measure bf16 `bf16_speedup` times as fast as fp32 (the real steps still run)."""
    real = amp.time_precisions

    def fake(run_step, shapes, **kw):
        costs, timed = real(run_step, shapes, **kw)
        return {"fp32": [1.0] * len(costs["fp32"]), "bf16": [1.0 / bf16_speedup] * len(costs["bf16"])}, timed

    monkeypatch.setattr(amp, "time_precisions", fake)


def _no_probing(monkeypatch):
    def refuse(*args, **kw):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(amp, "time_precisions", refuse)


def test_amp_run_prints_records_and_caches_the_measured_choice(tmp_path, dataset, monkeypatch):
    import io

    _fake_timings(monkeypatch, 0.84)
    flags = {**TINY, "quiet": False, "data": str(dataset), "max_steps": 2, "amp": True}
    out = io.StringIO()
    assert run_fit({**flags, "out": str(tmp_path / "a")}, stream=out) == 0
    line = out.getvalue().splitlines()[0]
    assert "precision fp32: --amp: bf16 measured 0.84x fp32 at this model's" in line and line.endswith("-> fp32")

    config = json.loads((tmp_path / "a/config.json").read_text())
    record = config["derived"]["precision"]
    assert record["name"] == "fp32" and record["rule"] == "amp" and record["probe"]["ratio"] == pytest.approx(0.84)
    ckpt = load_checkpoint(tmp_path / "a/checkpoints/last.pt")
    assert ckpt["precision"] == record
    assert ckpt["config"] == {k: v for k, v in config.items() if k != "derived"}

    # config.json is still a --config file: the record is skipped, the options are read
    values = read_config_file(tmp_path / "a/config.json")
    assert "derived" not in values and values["precision"] is None and values["amp"] is True
    assert resolve_config({}, values).train.amp is True

    # the same config again: the cached answer, no probe
    _no_probing(monkeypatch)
    out = io.StringIO()
    assert run_fit({"out": str(tmp_path / "b"), "quiet": False}, config_file=str(tmp_path / "a/config.json"),
                   stream=out) == 0
    line = out.getvalue().splitlines()[0]
    assert "precision fp32: --amp: bf16 measured 0.84x fp32" in line and "cached" in line


def test_resumed_amp_run_keeps_its_precision_without_probing(tmp_path, dataset, monkeypatch, checksum_cache):
    import io
    import shutil

    _fake_timings(monkeypatch, 1.5)
    run = tmp_path / "run"
    assert run_fit({**TINY, "data": str(dataset), "out": str(run), "max_steps": 2, "amp": True}) == 0
    assert load_checkpoint(run / "checkpoints/last.pt")["precision"]["name"] == "bf16"

    shutil.rmtree(checksum_cache / "precision")  # neither the cache ...
    _no_probing(monkeypatch)  # ... nor a probe: the checkpoint says
    out = io.StringIO()
    assert run_fit({"out": str(run), "max_steps": 4, "quiet": False}, resume=True, stream=out) == 0
    line = out.getvalue().splitlines()[0]
    assert "precision bf16: --amp: bf16, kept from the start of the run: bf16 measured 1.50x fp32 then" in line
    ckpt = load_checkpoint(run / "checkpoints/last.pt")
    assert ckpt["step"] == 4 and ckpt["precision"]["name"] == "bf16" and ckpt["precision"]["probe"]["ratio"] == 1.5
    # --precision still forces
    assert run_fit({"out": str(run), "max_steps": 5, "precision": "fp32"}, resume=True) == 0
    assert load_checkpoint(run / "checkpoints/last.pt")["precision"]["name"] == "fp32"


def _global_rng():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def test_the_probe_leaves_the_model_optimizer_and_every_generator_as_they_were(tmp_path, dataset):
    """A Trainer built with --amp (probing for real) equals one built with --precision set to the probe's
    answer: weights, no gradients, empty optimizer state, and the same global generator states after."""
    import dataclasses

    from streamtrain.train.dataprep import prepare_data
    from streamtrain.train.trainer import Trainer

    def build(**flags):
        cfg = resolve_config({**TINY, "data": str(dataset), "out": str(tmp_path / "r"), "max_steps": 3,
                              "dropout": 0.1, **flags})
        data = prepare_data(cfg, tmp_path / "r", is_main=True)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=data.index.dim))
        trainer = Trainer(cfg, data, tmp_path / "r", torch.device("cpu"))
        return trainer, _global_rng()

    probed, rng_probed = build(amp=True)
    assert probed.precision.probe is not None and not probed.precision.probe.cached
    forced, rng_forced = build(precision=probed.precision.name)
    assert rng_probed[0] == rng_forced[0] and rng_probed[1] == rng_forced[1]
    assert torch.equal(rng_probed[2], rng_forced[2])
    for a, b in zip(probed.model.parameters(), forced.model.parameters()):
        assert torch.equal(a, b) and a.grad is None
    assert probed.optimizer.state_dict()["state"] == {}


def test_an_amp_run_trains_exactly_like_one_forced_to_the_probes_choice(tmp_path, dataset):
    """With dropout (which draws from the global generator), so that a probe consuming random numbers or
    leaving a changed model behind would show."""
    common = {**TINY, "data": str(dataset), "max_steps": 4, "dropout": 0.1, "batch_tokens": 96}
    assert run_fit({**common, "out": str(tmp_path / "amp"), "amp": True}) == 0
    probed = load_checkpoint(tmp_path / "amp/checkpoints/last.pt")
    assert probed["precision"]["probe"] is not None
    assert run_fit({**common, "out": str(tmp_path / "forced"), "precision": probed["precision"]["name"]}) == 0
    forced = load_checkpoint(tmp_path / "forced/checkpoints/last.pt")
    for name, weights in probed["model"].items():
        assert torch.equal(weights, forced["model"][name]), name
    assert torch.equal(probed["rng"]["torch"], forced["rng"]["torch"])
