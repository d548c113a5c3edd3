"""distributed: the packed per-step control exchange and the broadcast of rank 0's validation sums."""

import pytest
import torch

from streamtrain.distributed import (
    DistInfo,
    StepControl,
    all_reduce_max,
    all_reduce_sum,
    broadcast_from_main,
    exchange_step_control,
)


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
