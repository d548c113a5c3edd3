"""The peak MFU is quoted against: a GPU datasheet table keyed by exact device name, else a timed matmul."""

from __future__ import annotations

import time

__all__ = ["measure_matmul_peak_tflops", "gpu_peak_tflops", "device_peak_tflops"]


def measure_matmul_peak_tflops(size: int | None = None, budget_s: float = 0.2, dtype=None, device=None) -> float:
    """Median TFLOP/s of a (size x size) @ (size x size) matmul in `dtype` (default fp32) on `device`
    (default CPU) over ~budget_s: the attainable peak MFU is quoted against where no datasheet figure
    applies (no table covers every CPU and thread count, nor every GPU). `size` defaults to 1024 on a CPU
    and 8192 on a GPU, large enough to reach the tensor cores' rate."""
    import torch

    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    # never touch the global RNG: the training stream must not depend on this
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=device).to(dtype)
    out = torch.empty(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b, out=out)  # warm up the kernel selection and caches
    sync()
    repeats = 1
    if device.type == "cuda":  # one launch is short next to a host sync: time a few per reading
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        repeats = max(1, min(50, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
    rates = []
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or len(rates) < 3:
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        sync()
        rates.append(repeats * 2.0 * size**3 / (time.perf_counter() - t0) / 1e12)
    rates.sort()
    return rates[len(rates) // 2]


# Dense peak TFLOP/s (no structured sparsity: datasheets quote "X | 2X*" or "2X with sparsity"; the
# table holds X) by the exact name torch.cuda.get_device_name() reports, normalized by _gpu_key.
# bf16/fp16: tensor cores with fp32 accumulation, what autocast matmuls use (GeForce cards run those at
# half their fp16-accumulate rate); tf32: fp32 matmuls when torch allows TF32; fp32: without tensor cores.
# A precision the GPU has no units for (bf16 before Ampere) is absent, and then measured like an unknown GPU.
# Sources: NVIDIA datasheets (H100, H200, GH200, A100, A10, L4, L40, L40S, V100, T4), NVIDIA architecture
# whitepapers (GA102 for the RTX 3090, AD102 for the RTX 4090, RTX A6000); the A10G, made for AWS, has no
# NVIDIA datasheet: AWS G5 / vendor spec tables.
_HOPPER_SXM = {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}


_HOPPER_NVL = {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}


_A100 = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}


_V100_SXM2 = {"fp16": 125.0, "fp32": 15.7}


_V100_PCIE = {"fp16": 112.0, "fp32": 14.0}


_GPU_PEAKS_BY_NAME = {
    "NVIDIA H100 80GB HBM3": _HOPPER_SXM,  # H100 SXM5
    "NVIDIA H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "NVIDIA H100 NVL": _HOPPER_NVL,
    "NVIDIA H200": _HOPPER_SXM,  # H200 SXM: the H100 SXM's compute, more and faster memory
    "NVIDIA H200 NVL": _HOPPER_NVL,
    "NVIDIA GH200 480GB": _HOPPER_SXM,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "NVIDIA A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 35.0},
    "NVIDIA L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "NVIDIA L40": {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5},
    "NVIDIA L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "Tesla V100-SXM2-16GB": _V100_SXM2,
    "Tesla V100-SXM2-32GB": _V100_SXM2,
    "Tesla V100-PCIE-16GB": _V100_PCIE,
    "Tesla V100-PCIE-32GB": _V100_PCIE,
    "Tesla V100S-PCIE-32GB": {"fp16": 130.0, "fp32": 16.4},
    "Tesla T4": {"fp16": 65.0, "fp32": 8.1},
    "NVIDIA GeForce RTX 3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
    "NVIDIA GeForce RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "NVIDIA RTX A6000": {"bf16": 154.8, "fp16": 154.8, "fp32": 38.7},
}


def _gpu_key(device_name: str) -> str:
    return " ".join(device_name.split()).casefold()


_GPU_PEAKS = {_gpu_key(name): peaks for name, peaks in _GPU_PEAKS_BY_NAME.items()}


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """Datasheet dense peak of the GPU named exactly `device_name` (torch.cuda.get_device_name(); case and
    spacing do not matter) at `precision` ('bf16', 'fp16', 'tf32', 'fp32'); None when the name is not in
    the table or the GPU has no units for that precision. Names are never matched in part: "NVIDIA L40S"
    is not an L4 and "NVIDIA H100 PCIe" not an H100 SXM."""
    return _GPU_PEAKS.get(_gpu_key(device_name), {}).get(precision)


def device_peak_tflops(device, precision: str, device_name: str | None = None, measure=None) -> float:
    """The peak MFU divides by on `device` when training in `precision` [TFLOP/s]: on a GPU the datasheet
    figure of its exact model (fp32 counts as tf32 where torch lets matmuls use TF32), else a matmul
    measured on the device in the training precision; on a CPU always measured, fp32 for fp16 (emulated
    there: no fp16 matmul units). `device_name` defaults to torch's, `measure` (size/budget_s/dtype/device
    keywords, TFLOP/s) to measure_matmul_peak_tflops."""
    import torch

    device = torch.device(device)
    measure = measure or measure_matmul_peak_tflops
    if device.type != "cuda":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return measure(dtype=dtype, device=device)
    key = precision
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    peak = gpu_peak_tflops(device_name or torch.cuda.get_device_name(device), key)
    if peak is not None:
        return peak
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return measure(dtype=dtype, device=device)
