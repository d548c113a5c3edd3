"""fit under torchrun, as users start it: a rank killed mid-run ends the job in bounded time with one line
naming it; `--max-restarts` resumes from the last checkpoint; `fit --nproc N` launches torchrun itself."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamtrain.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--synthetic", "48,24", "--d-model", "16", "--layers", "1", "--heads", "2", "--ff", "32",
        "--batch-tokens", "128", "--device", "cpu", "--threads", "1", "--log-every", "1", "--save-every", "2"]
JOB_TIMEOUT_S = 120  # a hang fails the test instead of the suite


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def _run_job(cmd: list[str], env: dict, cwd=None) -> subprocess.CompletedProcess:
    """Run `cmd` in a session of its own; past JOB_TIMEOUT_S kill all of it (torchrun and its ranks) and fail."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job hung past {JOB_TIMEOUT_S} s:\n{out[-2000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun(run_dir, *argv, torchrun_args=(), **env) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *torchrun_args,
           "-m", "streamtrain", "fit", *TINY, "--out", str(run_dir), *argv]
    t0 = time.monotonic()
    done = _run_job(cmd, _env(**env))
    return done, time.monotonic() - t0


def _metric_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_with_one_line_naming_it(tmp_path):
    done, elapsed_s = _torchrun(tmp_path / "run", "--max-steps", "1000", STREAMTRAIN_TEST_KILL_AT_STEP="5")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert elapsed_s < 60, out  # includes two interpreter starts and torchrun's own bookkeeping
    ours = [line for line in out.splitlines() if line.startswith("streamtrain fit: error:")]
    assert len(ours) == 1, out
    assert "rank 1 of 2 lost at step 5" in ours[0]
    assert "pair.cc" not in out  # gloo's error became the line, not a traceback
    # the survivor exited on its own with the rank-lost code, before torchrun had to kill it
    assert "exitcode  : 4" in out, out
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == 4


@pytest.mark.slow
def test_max_restarts_resumes_from_the_last_checkpoint_and_finishes(tmp_path):
    run_dir = tmp_path / "run"
    done, _ = _torchrun(run_dir, "--max-steps", "10", torchrun_args=("--max-restarts", "1"),
                        STREAMTRAIN_TEST_KILL_AT_STEP="5")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "rank 1 of 2 lost at step 5" in out  # the first attempt did die
    assert f"torchrun restart 1: resuming from {run_dir / 'checkpoints' / 'last.pt'}" in out
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["step"] == 10
    # steps 1-4 from the first attempt (its step 5 was never saved, so the restart redid it), 5-10 after
    assert _metric_steps(run_dir) == list(range(1, 11))


def test_without_nproc_keeps_every_other_argument():
    from streamtrain.train.launch import torchrun_command, without_nproc

    argv = ["--synthetic", "8,4", "--nproc", "2", "--out", "r", "--nproc=3", "--lr", "1e-3"]
    assert without_nproc(argv) == ["--synthetic", "8,4", "--out", "r", "--lr", "1e-3"]
    cmd = torchrun_command(4, ["--out", "r"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m", "streamtrain",
                       "fit", "--out", "r"]


def test_nproc_under_torchrun_or_below_one_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from streamtrain.cli import main

    assert main(["fit", "--nproc", "0", "--synthetic", "8,4", "--out", str(tmp_path / "r")]) == 2
    assert "--nproc must be >= 1, got 0" in capsys.readouterr().err
    # flags are checked before any process starts
    assert main(["fit", "--nproc", "2", "--synthetic", "8,4", "--out", str(tmp_path / "r"), "--lr", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["streamtrain fit: error: --lr must be > 0, got -1.0"]
    assert main(["fit", "--nproc", "2", "--out", str(tmp_path / "r")]) == 2
    assert "no training data" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["fit", "--nproc", "2", "--synthetic", "8,4", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already runs under torchrun: drop --nproc" in err[0]


@pytest.mark.slow
def test_fit_nproc_2_trains_in_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "streamtrain", "fit", "--nproc", "2", *TINY, "--out", str(run_dir), "--max-steps", "4"]
    done = _run_job(cmd, _env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    checkpoint = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert checkpoint["step"] == 4
    assert len(checkpoint["rng_by_rank"]) == 2  # written by a job of two ranks
    assert not torch.equal(checkpoint["rng_by_rank"][0]["torch"], checkpoint["rng_by_rank"][1]["torch"])
    # each step of two ranks draws twice the batches of one: 4 steps, 8 global batches
    assert checkpoint["loader"]["global_batches_done"] == 8 and checkpoint["loader"]["world_size"] == 2
    assert _metric_steps(run_dir) == [1, 2, 3, 4]
