"""`fit --tensorboard`: one line and exit 2 without the tensorboard package; with it, event files that
tensorboard's own reader reads, holding the metrics.jsonl scalars."""

import importlib.util
import json
import sys

import pytest

from streamtrain.cli import main

FIT = ["fit", "--synthetic", "12,10", "--d-model", "16", "--heads", "2", "--layers", "1", "--ff", "16",
       "--max-steps", "4", "--log-every", "1", "--num-workers", "0", "--batch-tokens", "64", "--quiet"]


def test_tensorboard_without_the_package_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails, as without the package
    code = main([*FIT, "--out", str(tmp_path / "run"), "--tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--tensorboard needs the tensorboard package (pip install tensorboard)" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any work


def test_tensorboard_event_files_hold_the_metrics_scalars(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("the tensorboard package is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main([*FIT, "--out", str(out), "--tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records if r.get("loss") is not None]
    assert "real_tokens_per_s" in events.Tags()["scalars"]


def test_fit_writes_every_finite_number_of_each_record_as_a_scalar(tmp_path, monkeypatch):
    """Through a stand-in SummaryWriter (tensorboard itself may be missing): what fit hands over."""
    import types

    calls = []

    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, tag, value, global_step):
            calls.append((tag, value, global_step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    out = tmp_path / "run"
    assert main([*FIT, "--out", str(out), "--tensorboard"]) == 0
    assert calls[0] == ("open", str(out / "tensorboard")) and calls[-1] == ("close",)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [(k, v, r["step"]) for r in records for k, v in r.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert calls[1:-1] == expected and any(c[0] == "loss" for c in expected)
