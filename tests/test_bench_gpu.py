"""benchmarks/gpu.sh: its --dry-run (the GPU matrix in miniature on the CPU) runs every code path and reports
each run; without a GPU the real thing stops with one line; the report reads the second half of a run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _env():
    env = dict(os.environ, PYTHON=sys.executable)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.mark.slow
def test_dry_run_reports_every_run(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "gpu" and result["bf16_matmul_peak_tflops"] > 0
    assert sorted(result["runs"]) == sorted(f"32x1x64x2-{p}" for p in ("bf16-1dev", "fp16-1dev", "fp32-1dev", "bf16-2dev"))
    for label, run in result["runs"].items():
        assert run is not None, label
        assert run["real_tokens_per_s"] > 0, label
        assert 0 < run["mfu_vs_bf16_peak"] < 1, label
        assert 0 <= run["data_wait_fraction"] <= 1, label
        assert run["steps"] == 6, label
    assert json.loads((tmp_path / "gpu.json").read_text()) == result
    for label in result["runs"]:  # the precision each run was asked for is the one it trained in
        config = json.loads((tmp_path / "runs" / label / "config.json").read_text())
        assert label.split("-")[1] in json.dumps(config), label


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the real benchmark would run")
def test_without_a_gpu_it_stops_with_one_line(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["gpu.sh: error: torch sees no CUDA GPU here (--dry-run runs the miniature on the CPU)"]


def test_unknown_option_exits_2():
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--fast" in done.stderr


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_takes_medians_of_the_second_half(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 10 * (i + 1), "real_tokens_per_s": v, "mfu": v / 1000, "data_wait_fraction": 0.1, "pad_fraction": 0.02}
             for i, v in enumerate([1.0, 2.0, 300.0, 400.0, 500.0])]  # the first two: warm-up, compilation
    lines.insert(3, {"step": 35, "val_mse": 0.5})  # a validation line has no throughput
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = _report_module().summarize(run)
    assert summary["real_tokens_per_s"] == 400.0 and summary["mfu_vs_bf16_peak"] == 0.4
    assert summary["records_used"] == 3 and summary["steps"] == 50
    assert _report_module().summarize(tmp_path / "missing") is None
