"""Run hygiene: --keep-checkpoints (newest N plus best), --patience (early stop), --ema (a moving average
of the weights, validated, saved, resumed bitwise)."""

import json

import pytest
import torch
from eval_support import DIM

from streamtrain.cli import main
from streamtrain.dataset.synthetic import write_synthetic
from streamtrain.errors import UserError
from streamtrain.train.checkpoint import load_checkpoint
from streamtrain.train.run import run_fit

TINY = {"d_model": 16, "layers": 1, "heads": 2, "ff": 32, "num_workers": 0, "quiet": True, "log_every": 1,
        "batch_tokens": 64, "max_len": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hygiene") / "data"
    write_synthetic(root, num_sequences=30, length=12, dim=DIM, seed=3)
    return root


def test_keep_checkpoints_keeps_the_newest_n_plus_best_and_last(tmp_path, data):
    out = tmp_path / "run"
    assert run_fit({**TINY, "data": str(data), "out": str(out), "max_steps": 10, "save_every": 2,
                    "keep_checkpoints": 2, "val_fraction": 0.2, "eval_every": 3}) == 0
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*.pt")) == ["step-000000008.pt", "step-000000010.pt"]
    assert load_checkpoint(folder / "step-000000008.pt")["step"] == 8
    assert load_checkpoint(folder / "step-000000010.pt")["step"] == load_checkpoint(folder / "last.pt")["step"] == 10
    assert (folder / "best.pt").is_file()
    assert not list(folder.glob(".*.tmp"))


def test_patience_stops_when_validation_has_not_improved_for_n_evaluations(tmp_path, data, monkeypatch):
    from streamtrain.train.trainer import Trainer

    losses = iter([1.0, 0.8, 0.9, 0.85, 0.7, 0.6])  # the 3rd and 4th evaluations find no new best
    real = Trainer.validate

    def scripted(self, model=None):
        report = real(self, model)
        report["standardized_mse"] = next(losses)
        return report

    monkeypatch.setattr(Trainer, "validate", scripted)
    out = tmp_path / "run"
    assert run_fit({**TINY, "data": str(data), "out": str(out), "max_steps": 50, "val_fraction": 0.2,
                    "eval_every": 2, "patience": 2, "quiet": False}) == 0
    assert load_checkpoint(out / "checkpoints/last.pt")["step"] == 8  # the 4th evaluation
    assert load_checkpoint(out / "checkpoints/best.pt")["step"] == 4  # the 2nd, the best
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 8


@pytest.mark.parametrize("flags, fragment", [
    ({"patience": 2, "eval_every": 2}, "--patience needs validation data"),
    ({"patience": 2, "val_fraction": 0.2}, "--patience needs --eval-every"),
    ({"ema": 1.0}, "--ema must be in (0, 1)"),
    ({"keep_checkpoints": -1}, "--keep-checkpoints must be >= 0"),
])
def test_bad_hygiene_flags_are_user_errors(tmp_path, data, flags, fragment):
    with pytest.raises(UserError) as e:
        run_fit({**TINY, "data": str(data), "out": str(tmp_path / "r"), "max_steps": 2, **flags})
    assert fragment in str(e.value)


def test_ema_follows_the_formula_on_a_toy_module():
    from streamtrain.train.ema import WeightEMA

    module = torch.nn.Linear(3, 2)
    start = {k: v.detach().clone().double() for k, v in module.state_dict().items()}
    ema = WeightEMA(module, decay=0.9)
    seen = []
    for scale in (1.5, -2.0):
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(scale).add_(0.25)
        seen.append({k: v.detach().clone().double() for k, v in module.state_dict().items()})
        ema.update(module)
    for k, v in ema.state_dict().items():
        ref = 0.81 * start[k] + 0.09 * seen[0][k] + 0.1 * seen[1][k]
        torch.testing.assert_close(v.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_ema_is_validated_saved_and_resumed_bitwise(tmp_path, data, capsys):
    common = {**TINY, "data": str(data), "ema": 0.8, "val_fraction": 0.2, "eval_every": 4, "dropout": 0.1}
    assert run_fit({**common, "out": str(tmp_path / "a"), "max_steps": 12}) == 0
    assert run_fit({**common, "out": str(tmp_path / "b"), "max_steps": 6, "decay_steps": 12}) == 0
    assert run_fit({"out": str(tmp_path / "b"), "max_steps": 12, "quiet": True}, resume=True) == 0
    a = load_checkpoint(tmp_path / "a/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "b/checkpoints/last.pt")
    assert a["step"] == b["step"] == 12
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
        assert torch.equal(a["ema"][name], b["ema"][name]), name
        assert not torch.equal(a["ema"][name], a["model"][name]) or a["model"][name].numel() == 0, name
    records = [json.loads(line) for line in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    validated = [r for r in records if "val_loss" in r]
    assert validated and all(r["ema_val_loss"] > 0 and r["ema_val_mse"] > 0 for r in validated)
    # load_model(ema=True) and eval --ema use the EMA weights
    import streamtrain

    model, _, _ = streamtrain.load_model(tmp_path / "a/checkpoints/last.pt", ema=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, a["ema"][name]), name
    capsys.readouterr()
    reports = []
    for extra in (["--ema"], []):
        assert main(["eval", "--checkpoint", str(tmp_path / "a/checkpoints/last.pt"), "--data", str(data), "--json",
                     "--device", "cpu", *extra]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["mse"] != reports[1]["mse"]
