"""Numeric precision: which dtype to compute in, and the one autocast + GradScaler code path that uses it.

`choose_precision` is a pure function of what the hardware offers so that every branch is testable on any
machine; `Precision.autocast()` and `Precision.scaler` are used the same way whatever was chosen (the scaler
is a no-op unless fp16, autocast is a no-op for fp32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["Precision", "choose_precision", "cpu_has_native_bf16", "build_precision"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU multiplies bf16 in hardware: x86 with AVX512-BF16 or AMX-BF16 in the `flags` line
    of /proc/cpuinfo (`cpuinfo`: that file's text; default: read it). Without them torch emulates bf16
    matmuls through fp32 conversions, which is slower than plain fp32.

    torch.backends.cpu.get_cpu_capability() cannot tell: it names the vector ISA ATen dispatches to
    ("DEFAULT", "AVX2", "AVX512", ...) and never a bf16 extension. ARM's `bf16` feature (BFDOT/BFMMLA)
    counts as no: whether torch uses it depends on the build (oneDNN with Arm Compute Library), so bf16
    autocast is not known to beat fp32 there; --precision bf16 forces it."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # x86 only; ARM lists "Features"
            return bool(set(value.split()) & _NATIVE_BF16_FLAGS)
    return False


def choose_precision(
    device_type: str, cuda_bf16_supported: bool, cpu_has_native_bf16: bool, forced: str | None = None, amp: bool = True
) -> tuple[str, str]:
    """Return (precision, reason): precision is 'fp32', 'bf16' or 'fp16'; reason is one human sentence.
    `forced` (--precision) wins; otherwise fp32 unless `amp` (--amp)."""
    if forced is not None:
        if forced == "fp16" and device_type == "cpu":
            return "fp16", "forced by --precision fp16 (slow on CPU: no fp16 matmul units)"
        return forced, f"forced by --precision {forced}"
    if not amp:
        return "fp32", "fp32 (pass --amp for mixed precision)"
    if device_type == "cuda":
        if cuda_bf16_supported:
            return "bf16", "--amp: bf16 autocast (the GPU supports bf16; no loss scaling needed)"
        return "fp16", "--amp: fp16 autocast with loss scaling (the GPU has no bf16)"
    if cpu_has_native_bf16:
        return "bf16", "--amp: bf16 autocast (the CPU has native bf16 instructions)"
    return "fp32", "--amp: staying in fp32 (this CPU has no native bf16, emulated bf16 would be slower)"


@dataclass
class Precision:
    name: str  # 'fp32' | 'bf16' | 'fp16'
    device_type: str  # 'cpu' | 'cuda'
    reason: str
    scaler: "torch.amp.GradScaler"

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def build_precision(device: torch.device, amp: bool, forced: str | None) -> Precision:
    device_type = device.type
    bf16_cuda = device_type == "cuda" and torch.cuda.is_bf16_supported()
    bf16_cpu = device_type == "cpu" and cpu_has_native_bf16()
    name, reason = choose_precision(device_type, bf16_cuda, bf16_cpu, forced, amp)
    scaler = torch.amp.GradScaler(device_type, enabled=(name == "fp16"))
    return Precision(name, device_type, reason, scaler)
