"""Training telemetry: the throughput meter, the peak MFU is quoted against, RUN/metrics.jsonl, the loss
plot, and the live view and summary on the terminal. Imports no torch at module level."""

from streamtrain.telemetry.live import LiveView, format_rate, summary_text
from streamtrain.telemetry.log import MetricsLog, read_metrics, training_record
from streamtrain.telemetry.meter import ThroughputMeter, peak_memory_mb
from streamtrain.telemetry.peaks import (
    device_peak_tflops,
    gpu_peak_tflops,
    measure_matmul_peak_tflops,
)
from streamtrain.telemetry.plot import plot_loss

__all__ = [
    "ThroughputMeter", "peak_memory_mb", "measure_matmul_peak_tflops", "gpu_peak_tflops", "device_peak_tflops",
    "MetricsLog", "read_metrics", "training_record", "plot_loss", "LiveView", "format_rate", "summary_text",
]
