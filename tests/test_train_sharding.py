"""--fsdp (FSDP2) on CPU with gloo: two sharded ranks train as one process with --grad-accum 2 does, and
their checkpoint, gathered whole, resumes in one process."""

import pytest
import torch


def _fsdp_rank(rank: int, port: int, flags: dict, results) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import streamtrain.train.run as fitrun

    report = {}

    class ReportingTrainer(fitrun.Trainer):
        def fit(self):
            code = super().fit()
            # this rank holds a shard of every matrix: half of its rows
            weight = self.model.embed.weight
            report["shard_rows"] = (weight.to_local().shape[0], weight.shape[0])
            return code

    fitrun.Trainer = ReportingTrainer
    code = fitrun.run_fit(flags)
    results.put((rank, code, report))


def _assert_close_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_fsdp_trains_as_one_process_and_its_checkpoint_resumes_in_one(tmp_path):
    from conftest import write_dataset
    from test_train_distributed import _free_port, spawn_two_ranks
    from test_train_trainer import TINY, _sequences

    from streamtrain.train.checkpoint import load_checkpoint
    from streamtrain.train.run import run_fit

    write_dataset(tmp_path / "data", [s[:24] for s in _sequences(40, max_len=60) if len(s) >= 24][:24])
    common = {**TINY, "data": str(tmp_path / "data"), "batch_tokens": 96, "batch": 4, "lr": 3e-3,
              "decay_steps": 8, "warmup_steps": 1, "device": "cpu", "save_every": 0}
    port = _free_port()
    flags = {**common, "out": str(tmp_path / "fsdp"), "max_steps": 3, "fsdp": True}
    got = spawn_two_ranks(_fsdp_rank, (port, flags))
    assert [code for _, code, _ in got] == [0, 0]
    assert got[0][2]["shard_rows"] == (16, 32)  # sharded, not replicated

    # one process, the same global batches per step (rank r takes batches r, r + 2, ...)
    assert run_fit({**common, "out": str(tmp_path / "alone"), "max_steps": 3, "grad_accum": 2}) == 0
    sharded = load_checkpoint(tmp_path / "fsdp/checkpoints/last.pt")
    alone = load_checkpoint(tmp_path / "alone/checkpoints/last.pt")
    assert sharded["step"] == alone["step"] == 3
    assert sharded["model"]["embed.weight"].shape == (32, 5)  # saved whole
    _assert_close_states(sharded["model"], alone["model"])
    for i, state in alone["optimizer"]["state"].items():
        _assert_close_states(sharded["optimizer"]["state"][i], state)

    # the sharded run's checkpoint resumes in one process exactly as the 1-process run's does
    for run in ("fsdp", "alone"):
        assert run_fit({"out": str(tmp_path / run), "max_steps": 5, "grad_accum": 2, "fsdp": False}, resume=True) == 0
    _assert_close_states(load_checkpoint(tmp_path / "fsdp/checkpoints/last.pt")["model"],
                         load_checkpoint(tmp_path / "alone/checkpoints/last.pt")["model"])
