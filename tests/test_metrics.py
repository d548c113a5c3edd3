"""Metrics: throughput arithmetic, metrics.jsonl append/truncate, the plot, the GPU peak table."""

import json

from streamtrain.metrics import MetricsLog, ThroughputMeter, gpu_peak_tflops, plot_loss, read_metrics


def test_throughput_counts_real_and_padded_tokens_apart():
    meter = ThroughputMeter(peak_flops_per_s=None)
    meter.add(real_tokens=300, padded_tokens=400, data_wait_s=0.0, flops=1e6)
    snap = meter.snapshot()
    assert abs(snap["pad_fraction"] - 0.25) < 1e-12
    assert abs(snap["real_tokens_per_s"] / snap["padded_tokens_per_s"] - 0.75) < 1e-12
    assert snap["mfu"] is None
    meter2 = ThroughputMeter(peak_flops_per_s=1e30)
    meter2.add(10, 10, 0.0, 1e6)
    assert 0 <= meter2.snapshot()["mfu"] < 1


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


def test_gpu_peak_table():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert gpu_peak_tflops("Some Unknown GPU", "bf16") is None
