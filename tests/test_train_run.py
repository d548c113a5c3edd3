"""fitrun: the run folder, resume of the schedule, and the defaults fixed in the run's config."""

import json

import pytest
from conftest import write_dataset
from test_train_trainer import TINY, _sequences

from streamtrain.train.checkpoint import load_checkpoint
from streamtrain.train.config import COMPILE_MAX_SHAPES, OptimConfig
from streamtrain.train.run import run_fit
from streamtrain.train.schedule import lr_at


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, _sequences(37), shard_bytes=1500)
    return root


def test_a_time_limit_hit_before_the_horizon_probe_leaves_the_schedule_free_on_resume(tmp_path, dataset):
    out = tmp_path / "run"
    assert run_fit({**TINY, "data": str(dataset), "out": str(out), "max_steps": 10, "max_seconds": 1e-6}) == 0
    first = load_checkpoint(out / "checkpoints/last.pt")
    assert first["step"] == 1  # stopped long before the step time was measured
    assert first["scheduler"]["estimated"] is False and first["scheduler"]["decay_steps"] == 10

    assert run_fit({"out": str(out), "max_steps": 30, "max_seconds": None, "quiet": True}, resume=True) == 0
    ckpt = load_checkpoint(out / "checkpoints/last.pt")
    assert ckpt["step"] == 30 and ckpt["scheduler"]["decay_steps"] == 30
    warmup = ckpt["scheduler"]["warmup_steps"]
    assert warmup == first["scheduler"]["warmup_steps"]  # the run keeps its warmup
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    optim = OptimConfig()
    for r in records[1:]:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, optim, 30, warmup), rel=1e-12)
    assert records[19]["lr"] > 2 * optim.lr * optim.min_lr_fraction  # not sitting at the minimum past step 10


def test_the_default_max_shapes_is_fixed_in_the_run_config():
    from streamtrain.data import ShardStream
    from streamtrain.train.config import resolve_config
    from streamtrain.train.run import _with_max_shapes

    loader_default = ShardStream.__init__.__kwdefaults__["max_shapes"]
    resolved = lambda resumed, **flags: _with_max_shapes(resolve_config(flags), resumed).data.max_shapes  # noqa: E731
    assert resolved(False) == loader_default
    assert resolved(False, compile=True) == COMPILE_MAX_SHAPES
    assert resolved(False, compile=True, max_shapes=5) == 5
    # a resumed config without the field predates it: its run used the loader's default
    assert resolved(True, compile=True) == loader_default


def test_config_json_and_the_checkpoint_hold_the_same_config(tmp_path, dataset):
    out = tmp_path / "run"
    assert run_fit({**TINY, "data": str(dataset), "out": str(out), "max_steps": 2}) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["max_shapes"] is not None and config["optim"]["warmup_steps"] is None
    ckpt = load_checkpoint(out / "checkpoints/last.pt")
    derived = config.pop("derived")  # what the run chose, which a --config file does not set
    assert ckpt["config"] == config and ckpt["precision"] == derived["precision"]


def test_resume_needs_a_checkpoint_and_a_new_run_needs_a_fresh_folder(tmp_path, dataset):
    from streamtrain.errors import UserError

    with pytest.raises(UserError, match="--resume: .* does not exist"):
        run_fit({"out": str(tmp_path / "none")}, resume=True)
    assert run_fit({**TINY, "data": str(dataset), "out": str(tmp_path / "r"), "max_steps": 1}) == 0
    with pytest.raises(UserError, match="already holds a run"):
        run_fit({**TINY, "data": str(dataset), "out": str(tmp_path / "r"), "max_steps": 1})


# ---------------------------------------------------------------------------------------------------------
# Faults: a fit killed at any moment resumes to the weights of an uninterrupted run

FAULT_STEPS = 40  # the run's horizon (--decay-steps), so that a run's schedule does not depend on where it stops


@pytest.fixture(scope="module")
def fault_setup(tmp_path_factory):
    """A dataset, the common flags, and the weights of an uninterrupted FAULT_STEPS-step run."""
    import torch

    root = tmp_path_factory.mktemp("faults")
    write_dataset(root / "data", _sequences(37), shard_bytes=1500)
    flags = {**TINY, "data": str(root / "data"), "batch_tokens": 96, "dropout": 0.1, "lr": 3e-3,
             "decay_steps": FAULT_STEPS, "save_every": 4, "threads": torch.get_num_threads(), "peak_tflops": 1.0}
    assert run_fit({**flags, "out": str(root / "reference"), "max_steps": FAULT_STEPS}) == 0
    return flags, load_checkpoint(root / "reference/checkpoints/last.pt")["model"]


def _cli_args(flags: dict) -> list[str]:
    args = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def _temp_files(out):
    return sorted((out / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["exit-in-checkpoint-write", "sigkill-in-checkpoint-write", "sigkill-in-a-step"])
def test_a_killed_fit_resumes_to_the_uninterrupted_weights(tmp_path, fault_setup, fault):
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    import torch

    from streamtrain.errors import UserError

    flags, reference = fault_setup
    out = tmp_path / "run"
    env = dict(os.environ)
    if fault == "exit-in-checkpoint-write":  # os._exit half-way through the third save (step 12)
        env.update(STREAMTRAIN_TEST_CRASH_AT="checkpoint-write", STREAMTRAIN_TEST_AT_SAVE="3")
    elif fault == "sigkill-in-checkpoint-write":  # kill -9 half-way through the second save (step 8)
        env.update(STREAMTRAIN_TEST_PAUSE_AT="checkpoint-write", STREAMTRAIN_TEST_AT_SAVE="2")
    # far more steps than the test lets it run: it is stopped by the fault, never by its end
    argv = [sys.executable, "-m", "streamtrain", "fit", *_cli_args(flags), "--out", str(out), "--max-steps", "2000"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        if fault == "sigkill-in-checkpoint-write":
            ready, _, _ = select.select([proc.stderr], [], [], 60)
            assert ready and proc.stderr.readline().strip() == "paused at checkpoint-write"
            proc.kill()
        elif fault == "sigkill-in-a-step":
            metrics = out / "metrics.jsonl"
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
                    break
                time.sleep(0.002)
            proc.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (86 if fault == "exit-in-checkpoint-write" else -signal.SIGKILL), err

    # the newest complete checkpoint loads; the save cut short left at most a temp file, which is no checkpoint
    last = load_checkpoint(out / "checkpoints/last.pt")
    expected = {"exit-in-checkpoint-write": {8}, "sigkill-in-checkpoint-write": {4}}.get(fault, {4, 8, 12, 16})
    assert last["step"] in expected
    temps = _temp_files(out)
    if fault != "sigkill-in-a-step":
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # half a checkpoint
    for temp in temps:
        with pytest.raises(UserError):
            load_checkpoint(temp)

    assert run_fit({"out": str(out), "max_steps": FAULT_STEPS, "quiet": True}, resume=True) == 0
    assert _temp_files(out) == []  # cleaned when the resumed run started
    resumed = load_checkpoint(out / "checkpoints/last.pt")
    assert resumed["step"] == FAULT_STEPS
    for name, weights in reference.items():
        assert torch.equal(resumed["model"][name], weights), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, FAULT_STEPS + 1))
