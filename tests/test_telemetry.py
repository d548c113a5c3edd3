"""Metrics: throughput arithmetic, metrics.jsonl append/truncate, the plot, the GPU peak table."""

import io
import json

from streamtrain.telemetry import (
    LiveView,
    MetricsLog,
    ThroughputMeter,
    gpu_peak_tflops,
    plot_loss,
    read_metrics,
    summary_text,
)


def test_throughput_counts_real_and_padded_tokens_apart():
    meter = ThroughputMeter(peak_flops_per_s=None)
    meter.add(real_tokens=300, padded_tokens=400, data_wait_s=0.0, flops=1e6)
    snap = meter.snapshot()
    assert abs(snap["pad_fraction"] - 0.25) < 1e-12
    assert abs(snap["real_tokens_per_s"] / snap["padded_tokens_per_s"] - 0.75) < 1e-12
    assert snap["mfu"] is None


def test_mfu_and_rates_against_a_frozen_clock():
    now = [100.0]
    meter = ThroughputMeter(peak_flops_per_s=4e6, clock=lambda: now[0])
    meter.add(real_tokens=300, padded_tokens=400, data_wait_s=0.5, flops=2e6)
    meter.add(real_tokens=100, padded_tokens=100, data_wait_s=0.0, flops=4e6)
    meter.exclude(1.0)  # e.g. a validation pass
    now[0] = 103.0  # 3 s, 1 of them excluded
    snap = meter.snapshot()
    assert snap["mfu"] == 6e6 / 2.0 / 4e6
    assert snap["real_tokens"] == 400 and snap["real_tokens_per_s"] == 200.0
    assert snap["padded_tokens_per_s"] == 250.0 and snap["data_wait_fraction"] == 0.25
    now[0] = 104.0  # the next interval starts from zero
    meter.add(10, 10, 0.0, 4e6)
    assert meter.snapshot()["mfu"] == 1.0


def test_summary_text_reports_the_final_loss_validation_and_median_rate(tmp_path):
    records = [{"step": s, "loss": 1.0 / s, "real_tokens_per_s": r} for s, r in ((1, 10.0), (2, 30.0), (3, 20.0))]
    val = {"mse": 0.25, "skill_vs_persistence": 0.5, "skill_vs_mean": None}
    text = summary_text(3, records[-1], val, records, tmp_path, "loss plot: x.png")
    lines = text.splitlines()
    assert lines[0] == "done: 3 steps | final loss 0.3333"
    assert "mse 0.25" in lines[1] and "persistence 0.500" in lines[1] and "vs mean n/a" in lines[1]
    assert lines[2] == "median real tokens/s: 20"
    assert lines[-2:] == [f"run folder: {tmp_path}", "loss plot: x.png"]
    assert summary_text(0, None, None, [], tmp_path, "p").splitlines()[0] == "done: 0 steps"


def test_metrics_log_appends_and_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": 1.0 / step, "mfu": float("nan")})
    log.close()
    assert json.loads(path.read_text().splitlines()[0])["mfu"] is None  # strict JSON, no NaN
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # a line cut by a crash
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": 0.1})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_plot_loss_writes_a_png(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"step": 5, "val_loss": 0.3})
    log.close()
    line = plot_loss(tmp_path)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "loss.png" in line


def test_gpu_peak_table_matches_exact_device_names():
    # dense bf16 datasheet figures: H100 SXM5 1979 / 2, H100 PCIe 1513 / 2, L40S 733 / 2, L4 242 / 2
    peaks = {name: gpu_peak_tflops(name, "bf16") for name in
             ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA L40S", "NVIDIA L4")}
    assert peaks == {"NVIDIA H100 80GB HBM3": 989.5, "NVIDIA H100 PCIe": 756.5, "NVIDIA L40S": 362.0,
                     "NVIDIA L4": 121.0}
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 67.0
    assert gpu_peak_tflops("  nvidia   L40S ", "bf16") == 362.0  # case and spacing do not matter
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == gpu_peak_tflops("NVIDIA A100 80GB PCIe", "fp16") == 312.0
    # a name is never matched in part, and a precision without units is not in the table
    assert gpu_peak_tflops("NVIDIA L40S-Something", "bf16") is None
    assert gpu_peak_tflops("NVIDIA H100", "bf16") is None
    assert gpu_peak_tflops("Tesla T4", "bf16") is None and gpu_peak_tflops("Tesla T4", "fp16") == 65.0
    assert gpu_peak_tflops("Some Unknown GPU", "bf16") is None


def test_device_peak_uses_the_table_and_measures_what_it_does_not_know():
    import torch

    from streamtrain.telemetry import device_peak_tflops

    measured = []

    def measure(dtype, device):
        measured.append((dtype, torch.device(device).type))
        return 123.0

    cuda = torch.device("cuda")
    assert device_peak_tflops(cuda, "bf16", device_name="NVIDIA L40S", measure=measure) == 362.0
    assert device_peak_tflops(cuda, "bf16", device_name="NVIDIA B300 Imaginary", measure=measure) == 123.0
    assert device_peak_tflops(cuda, "bf16", device_name="Tesla T4", measure=measure) == 123.0  # no bf16 units
    assert device_peak_tflops(cuda, "fp16", device_name="NVIDIA Unknown", measure=measure) == 123.0
    assert measured == [(torch.bfloat16, "cuda"), (torch.bfloat16, "cuda"), (torch.float16, "cuda")]
    # fp32 matmuls count at the TF32 rate where torch lets them use it
    matmul = torch.backends.cuda.matmul  # a module proxy that monkeypatch cannot restore
    allowed = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert device_peak_tflops(cuda, "fp32", device_name="NVIDIA H100 80GB HBM3", measure=measure) == 67.0
        matmul.allow_tf32 = True
        assert device_peak_tflops(cuda, "fp32", device_name="NVIDIA H100 80GB HBM3", measure=measure) == 494.5
    finally:
        matmul.allow_tf32 = allowed
    # on a CPU always measured, fp16 (emulated there) as fp32
    measured.clear()
    cpu = torch.device("cpu")
    for precision in ("fp32", "bf16", "fp16"):
        assert device_peak_tflops(cpu, precision, measure=measure) == 123.0
    assert measured == [(torch.float32, "cpu"), (torch.bfloat16, "cpu"), (torch.float32, "cpu")]


def test_measured_matmul_peak_is_positive_and_leaves_the_global_generator_alone():
    import torch

    from streamtrain.telemetry import measure_matmul_peak_tflops

    state = torch.get_rng_state()
    assert measure_matmul_peak_tflops(size=64, budget_s=0.01) > 0
    assert measure_matmul_peak_tflops(size=64, budget_s=0.01, dtype=torch.bfloat16, device="cpu") > 0
    assert torch.equal(torch.get_rng_state(), state)


_REWRITE_WITH_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from streamtrain.telemetry import MetricsLog

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
try:
    MetricsLog(sys.argv[1], resume_step=int(sys.argv[3]))
except OSError as e:
    print(f"failed: {e}")
    sys.exit(3)
"""


def test_a_failure_while_rewriting_on_resume_leaves_the_history_intact(tmp_path):
    """The rewrite on resume fails half-way (a file size limit stops the write after 4 KiB): the old
    metrics.jsonl must be exactly as it was, and no temp file is left behind."""
    import os
    import subprocess
    import sys

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 201):
        log.write({"step": step, "loss": 1.0 / step, "real_tokens_per_s": 1000.0 + step})
    log.close()
    before = path.read_bytes()
    assert len(before) > 3 * 4096  # what is kept (150 lines) does not fit under the limit either
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _REWRITE_WITH_A_FILE_SIZE_LIMIT, str(path), "4096", "150"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _record(step, elapsed_s):
    return {"step": step, "epoch": 0, "loss": 0.5, "lr": 1e-3, "real_tokens_per_s": 2e4, "pad_fraction": 0.1,
            "data_wait_fraction": 0.0, "mfu": None, "elapsed_s": elapsed_s}


def _plain_line(record, **view_args):
    out = io.StringIO()
    LiveView(quiet=False, stream=out, **view_args).log(record)
    return out.getvalue()


def test_live_view_line_counts_steps_without_a_time_budget():
    line = _plain_line(_record(276, 12.0), total_steps=6350, start_step=0)
    assert line.startswith("step 276/6350 | epoch 0 | lr 1.00e-03 | loss 0.5 | 20.0k real tok/s")


def test_live_view_line_shows_the_time_budget_instead_of_an_unreachable_step_total():
    line = _plain_line(_record(276, 12.0), total_steps=6350, start_step=0, max_seconds=60.0)
    assert "6350" not in line
    assert line.startswith("step 276 | 12s of 1m00s (20%) | ETA 48s | epoch 0 | lr 1.00e-03 | loss 0.5")
    # the step limit comes first: 24 steps left at 12 s / 276 steps
    assert "| ETA 1s |" in _plain_line(_record(276, 12.0), total_steps=300, start_step=0, max_seconds=60.0)
    # a resumed run times the steps of this session: 76 steps in 12 s, 6074 left -> the budget's 48 s
    assert "| ETA 48s |" in _plain_line(_record(276, 12.0), total_steps=6350, start_step=200, max_seconds=60.0)
    assert "2h00m of 3h00m (67%) | ETA 1h00m" in _plain_line(_record(5, 7200.0), total_steps=10**6, start_step=0,
                                                             max_seconds=10800.0)


def test_live_view_bar_counts_steps_or_seconds_of_the_budget():
    view = LiveView(6350, 10, quiet=False, stream=_Terminal())
    try:
        assert view.bar_position == (10, 6350)
        view.advance(276, 12.0)
        assert view.bar_position == (276, 6350)
    finally:
        view.close()
    view = LiveView(6350, 10, quiet=False, stream=_Terminal(), max_seconds=60.0)
    try:
        assert view.bar_position == (0.0, 60.0)
        view.advance(276, 12.0)
        assert view.bar_position == (12.0, 60.0)
        view.log(_record(300, 30.0))
        assert view.bar_position == (30.0, 60.0)
        view.advance(301, 61.5)  # the step that passes the budget is the last
        assert view.bar_position == (60.0, 60.0)
    finally:
        view.close()
    assert view.bar_position is None
    assert LiveView(10, 0, quiet=False, stream=io.StringIO()).bar_position is None  # no terminal, no bar
