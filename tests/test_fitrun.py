"""fitrun: the run folder, resume of the schedule, and the defaults fixed in the run's config."""

import json

import pytest
from conftest import write_dataset
from test_train import TINY, _sequences

from streamtrain.checkpoint import load_checkpoint
from streamtrain.config import COMPILE_MAX_SHAPES, OptimConfig
from streamtrain.fitrun import run_fit
from streamtrain.optim import lr_at


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
    from streamtrain.config import resolve_config
    from streamtrain.data import ShardStream
    from streamtrain.fitrun import _with_max_shapes

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
    assert load_checkpoint(out / "checkpoints/last.pt")["config"] == config


def test_resume_needs_a_checkpoint_and_a_new_run_needs_a_fresh_folder(tmp_path, dataset):
    from streamtrain.errors import UserError

    with pytest.raises(UserError, match="--resume: .* does not exist"):
        run_fit({"out": str(tmp_path / "none")}, resume=True)
    assert run_fit({**TINY, "data": str(dataset), "out": str(tmp_path / "r"), "max_steps": 1}) == 0
    with pytest.raises(UserError, match="already holds a run"):
        run_fit({**TINY, "data": str(dataset), "out": str(tmp_path / "r"), "max_steps": 1})
