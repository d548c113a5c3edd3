"""distributed: the packed per-step control exchange, heartbeats naming a lost rank, validation split over ranks."""

import os

import pytest
import torch

from streamtrain.train.distributed import (
    DistInfo,
    StepControl,
    all_reduce_max,
    all_reduce_sum,
    broadcast_from_main,
    exchange_step_control,
)


def spawn_two_ranks(target, args: tuple, timeout_s: float = 120) -> list:
    """Run `target(rank, *args, results)` in 2 spawned processes; their `results.put` values sorted by rank.
    Processes still alive when this returns or fails (a hung rank) are killed, so a test never hangs."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, *args, results)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        got = sorted(results.get(timeout=timeout_s) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        return got
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def test_alone_every_collective_is_the_identity():
    info, cpu = DistInfo(), torch.device("cpu")
    assert not info.enabled and info.is_main
    assert exchange_step_control(info, cpu, 17, True, False) == StepControl(17, True, False)
    values = torch.arange(3.0)
    summed = all_reduce_sum(info, values)
    assert torch.equal(summed, values) and summed is not values
    assert all_reduce_max(info, cpu, 2.5) == 2.5
    assert broadcast_from_main(info, values) is values


def _two_ranks(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        info, cpu = DistInfo(rank, 2, rank), torch.device("cpu")
        # rank 0 caught a signal, rank 1's clock ran out: both learn both, with the summed count
        control = exchange_step_control(info, cpu, [3, 2**40][rank], stop=rank == 0, time_up=rank == 1)
        quiet = exchange_step_control(info, cpu, 1, stop=False, time_up=False)
        sums = broadcast_from_main(info, torch.full((4,), float(rank + 7), dtype=torch.float64))
        results.put((rank, control, quiet, sums.tolist(), all_reduce_max(info, cpu, float(rank))))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_on_the_count_and_the_flags(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_two_ranks, args=(rank, str(tmp_path / "init"), results)) for rank in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, control, quiet, sums, peak in got:
        assert control == StepControl(3 + 2**40, True, True)
        assert quiet == StepControl(2, False, False)
        assert sums == [7.0] * 4  # rank 0's values everywhere
        assert peak == 1.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(tensors) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fit_rank(rank: int, port: int, flags: dict, resume: bool, results) -> None:
    """One rank of a 2-process `fit` on CPU (gloo), as torchrun would start it. Reports the digests of the
    weights it starts fit() with and of a dropout-active forward pass drawn from its RNG right then (the
    RNG state is put back, so the run itself is undisturbed)."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import streamtrain.train.run as fitrun

    probe = {}

    class ProbedTrainer(fitrun.Trainer):
        def fit(self):
            state = torch.get_rng_state()
            with torch.no_grad():
                out = self.model.train()(torch.ones(2, 16, self.cfg.model.dim))
            torch.set_rng_state(state)
            probe["weights"] = _digest(self.model.parameters())
            probe["dropout"] = _digest([out])
            return super().fit()

    fitrun.Trainer = ProbedTrainer  # this process only
    code = fitrun.run_fit(flags, resume=resume)
    results.put((rank, code, probe["weights"], probe["dropout"]))


def _spawn_fit(flags: dict, resume: bool = False) -> list:
    port = _free_port()
    got = spawn_two_ranks(_fit_rank, (port, flags, resume), timeout_s=120)
    assert [code for _, code, _, _ in got] == [0, 0]
    return got


@pytest.mark.slow
def test_each_rank_has_its_own_dropout_stream_reproducibly_and_resumes_it_exactly(tmp_path):
    """Both ranks start from the same weights but draw different dropout masks; a second run draws the same
    masks again; a run stopped half-way and resumed ends with the uninterrupted run's weights, bit for bit
    (every rank's RNG is in the checkpoint)."""
    from conftest import write_dataset
    from test_train_trainer import TINY, _sequences

    from streamtrain.train.checkpoint import load_checkpoint

    write_dataset(tmp_path / "data", _sequences(37), shard_bytes=1500)
    common = {**TINY, "data": str(tmp_path / "data"), "batch_tokens": 96, "dropout": 0.2, "lr": 3e-3,
              "decay_steps": 6, "device": "cpu", "save_every": 0}
    full = _spawn_fit({**common, "out": str(tmp_path / "full"), "max_steps": 6})
    (_, _, weights0, dropout0), (_, _, weights1, dropout1) = full
    assert weights0 == weights1  # the model was initialised alike on every rank
    assert dropout0 != dropout1  # but each rank masks its own way

    half = _spawn_fit({**common, "out": str(tmp_path / "half"), "max_steps": 3})
    assert [(w, d) for _, _, w, d in half] == [(w, d) for _, _, w, d in full]  # run to run: the same masks
    rng = load_checkpoint(tmp_path / "half/checkpoints/last.pt")["rng_by_rank"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    _spawn_fit({"out": str(tmp_path / "half"), "max_steps": 6, "quiet": True}, resume=True)

    a = load_checkpoint(tmp_path / "full/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "half/checkpoints/last.pt")
    assert a["step"] == b["step"] == 6
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_lost_ranks_are_those_whose_heartbeat_stopped_unless_they_finished():
    from datetime import timedelta

    import torch.distributed as dist

    from streamtrain.train.liveness import Heartbeat, lost_ranks

    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    beats = [Heartbeat(store, rank, "127.0.0.1", port, 10.0) for rank in range(3)]
    beats[0].start()
    beats[2].start()
    try:
        assert lost_ranks(store, 3, me=0, window_s=1.5) == [1]  # never beat: lost
        beats[2].stop(done=False)  # stopped without finishing: lost
        assert lost_ranks(store, 3, me=0, window_s=1.5) == [1, 2]
        beats[1].start()
        beats[1].stop(done=True)  # finished normally: silent but not lost
        assert lost_ranks(store, 3, me=0, window_s=1.5) == [2]
    finally:
        beats[0].stop(done=True)
    del store
    gone = dist.TCPStore("127.0.0.1", _free_port(), is_master=True, timeout=timedelta(seconds=2), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", gone.port, is_master=False, timeout=timedelta(seconds=2), wait_for_workers=False)
    del gone  # the store's host is down
    assert lost_ranks(client, 2, me=1, window_s=0.1) is None


def _validate_rank(rank: int, port: int, flags: dict, results) -> None:
    """One rank of a 2-process fit that reports how many validation sequences it evaluated itself and the
    validation summaries every rank ended up with."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import streamtrain.train.run as fitrun
    import streamtrain.train.validation as validation_module

    evaluated, summaries = [], []
    accumulate = validation_module.accumulate_eval

    def counting_accumulate(*args, **kwargs):
        sums = accumulate(*args, **kwargs)
        evaluated.append(int(sums.counts[2]))  # this rank's sequences, before the all-reduce
        return sums

    class RecordingTrainer(fitrun.Trainer):
        def validate(self):
            summaries.append(super().validate())
            return summaries[-1]

    validation_module.accumulate_eval = counting_accumulate  # this process only
    fitrun.Trainer = RecordingTrainer
    code = fitrun.run_fit(flags)
    results.put((rank, code, evaluated, summaries))


@pytest.mark.slow
def test_every_rank_validates_its_share_and_the_sums_equal_one_process(tmp_path):
    import dataclasses

    from conftest import write_dataset
    from test_train_trainer import TINY, _sequences

    from streamtrain.train.checkpoint import load_checkpoint
    from streamtrain.train.config import resolve_config
    from streamtrain.train.dataprep import prepare_data
    from streamtrain.train.trainer import Trainer

    write_dataset(tmp_path / "data", _sequences(61, max_len=60), shard_bytes=1500)
    flags = {**TINY, "data": str(tmp_path / "data"), "out": str(tmp_path / "run"), "batch_tokens": 96,
             "val_fraction": 0.4, "max_len": 24, "max_steps": 2, "device": "cpu", "save_every": 0}
    port = _free_port()
    got = spawn_two_ranks(_validate_rank, (port, flags), timeout_s=120)
    (_, code0, evaluated0, summaries0), (_, code1, evaluated1, summaries1) = got
    assert code0 == code1 == 0
    assert summaries0 == summaries1 and len(summaries0) == 1  # every rank took the same decision
    assert evaluated0[0] > 0 and evaluated1[0] > 0  # both ranks did part of the work

    # the same weights validated by one process over the whole set
    cfg = resolve_config({**flags, "out": str(tmp_path / "alone")})
    data = prepare_data(cfg, tmp_path / "alone", is_main=True)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=data.index.dim))
    alone = Trainer(cfg, data, tmp_path / "alone", torch.device("cpu"),
                    checkpoint=load_checkpoint(tmp_path / "run/checkpoints/last.pt"))
    assert alone.val_stream.num_global_batches() % 2 == 1  # so one rank's count is evened out by a repeat
    reference = alone.validate()
    assert reference["num_sequences"] == len(data.val_ids)
    # together every sequence (and window) once
    assert evaluated0[0] + evaluated1[0] == reference["num_sequences"]
    two = summaries0[0]
    for key in ("num_sequences", "num_tokens", "num_targets"):
        assert two[key] == reference[key], key
    for key in ("mse", "standardized_mse", "persistence_mse", "mean_mse"):
        assert two[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), key
    assert two["per_dim_mse"] == pytest.approx(reference["per_dim_mse"], rel=1e-9, abs=1e-12)


class _IdsRecorder:
    """A Trainer subclass factory that records the sequence ids of every step this process trains."""

    @staticmethod
    def patch(fitrun, seen: list):
        class RecordingTrainer(fitrun.Trainer):
            def _train_step(self, group):
                seen.append(torch.cat([b.ids for b in group]).tolist())
                return super()._train_step(group)

        fitrun.Trainer = RecordingTrainer


def _ids_rank(rank: int, port: int, flags: dict, resume: bool, results) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import streamtrain.train.run as fitrun

    seen: list = []
    _IdsRecorder.patch(fitrun, seen)
    code = fitrun.run_fit(flags, resume=resume)
    results.put((rank, code, seen))


def _spawn_ids(flags: dict, resume: bool) -> list:
    port = _free_port()
    got = spawn_two_ranks(_ids_rank, (port, flags, resume), timeout_s=120)
    assert [code for _, code, _ in got] == [0, 0]
    return [seen for _, _, seen in got]


def _fit_alone(monkeypatch, flags: dict, resume: bool) -> list:
    import streamtrain.train.run as fitrun

    seen: list = []
    with monkeypatch.context() as m:
        m.setattr(fitrun, "Trainer", fitrun.Trainer)  # put back after the recording subclass
        _IdsRecorder.patch(fitrun, seen)
        assert fitrun.run_fit(flags, resume=resume) == 0
    return seen


@pytest.mark.slow
def test_resume_at_another_world_size_continues_the_epoch_at_the_same_global_batch(tmp_path, monkeypatch):
    """One process trains 2 steps, two processes resume it for 2 steps (4 batches), one process resumes
    that to the end of the epoch: every sequence is trained on exactly once over the epoch."""
    from streamtrain.train.checkpoint import load_checkpoint

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    num_sequences = 48
    last = tmp_path / "run/checkpoints/last.pt"
    flags = {"synthetic": f"{num_sequences},24", "d_model": 16, "layers": 1, "heads": 2, "ff": 32,
             "num_workers": 0, "quiet": True, "batch_tokens": 128, "batch": 4, "device": "cpu",
             "out": str(tmp_path / "run"), "max_steps": 2, "save_every": 0}
    first = _fit_alone(monkeypatch, flags, resume=False)
    state = load_checkpoint(last)["loader"]
    assert (state["world_size"], state["global_batches_done"]) == (1, 2)
    num_global = 12  # 48 sequences of 24 vectors, 4 per batch

    second = _spawn_ids({"out": flags["out"], "max_steps": 4, "quiet": True}, resume=True)
    checkpoint = load_checkpoint(last)
    assert checkpoint["step"] == 4 and len(checkpoint["rng_by_rank"]) == 2
    assert (checkpoint["loader"]["world_size"], checkpoint["loader"]["global_batches_done"]) == (2, 6)

    # one process takes one batch per step: the 6 batches left in the epoch are 6 steps
    third = _fit_alone(monkeypatch, {"out": flags["out"], "max_steps": 4 + num_global - 6}, resume=True)
    checkpoint = load_checkpoint(last)
    assert checkpoint["step"] == 10
    assert (checkpoint["loader"]["epoch"], checkpoint["loader"]["batches_done"]) == (1, 0)

    assert len(first) == 2 and [len(s) for s in second] == [2, 2] and len(third) == num_global - 6
    ids = [i for step in first + second[0] + second[1] + third for i in step]
    assert sorted(ids) == list(range(num_sequences))  # exactly once over the epoch


def _compiled_rank(rank: int, port: int, flags: dict, results) -> None:
    """One rank of a 2-process --compile fit: reports how the step's module is wrapped and the digest of
    the weights it ends with."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import streamtrain.train.run as fitrun

    report = {}

    class ReportingTrainer(fitrun.Trainer):
        def fit(self):
            code = super().fit()
            outer = self.train_model
            report["wrapping"] = [type(outer).__name__, type(getattr(outer, "_orig_mod", outer)).__name__]
            report["weights"] = _digest(self.model.parameters())
            report["step"] = self.step
            return code

    fitrun.Trainer = ReportingTrainer
    code = fitrun.run_fit(flags)
    results.put((rank, code, report))


@pytest.mark.slow
def test_compile_under_two_processes_compiles_the_ddp_module_and_keeps_ranks_in_sync(tmp_path):
    """--compile with DDP on CPU (gloo), a tiny model, gradient accumulation (DDP's no_sync under the
    compiled module): the run finishes and both ranks end with the same weights. Costs a cold inductor
    compilation on each rank (tens of seconds on 2 cores)."""
    import shutil

    if not any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        pytest.skip("torch.compile's inductor backend needs a C++ compiler on CPU, and none is on PATH")
    flags = {"synthetic": "32,24", "batch": 4, "d_model": 16, "layers": 1, "heads": 2, "ff": 32, "num_workers": 0,
             "quiet": True, "batch_tokens": 128, "device": "cpu", "out": str(tmp_path / "run"), "max_steps": 3,
             "grad_accum": 2, "compile": True, "save_every": 0}
    port = _free_port()
    got = spawn_two_ranks(_compiled_rank, (port, flags), timeout_s=300)
    (_, code0, report0), (_, code1, report1) = got
    assert code0 == code1 == 0
    assert report0["step"] == report1["step"] == 3
    assert report0["wrapping"] == ["OptimizedModule", "DistributedDataParallel"]  # compile(DDP(model))
    assert report0["weights"] == report1["weights"]
