"""TF32 for fp32 matmuls: set for fp32 on CUDA only; any other precision or device leaves the setting alone."""

import pytest
import torch

from streamtrain.train.precision import build_precision, use_tf32_for_fp32


@pytest.fixture
def matmul_precision():
    """Start from full fp32 matmuls and put the process-wide settings back after the test."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def test_fp32_on_cuda_turns_tf32_on(matmul_precision):
    assert use_tf32_for_fp32("fp32", "cuda") is True
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.allow_tf32 is True


@pytest.mark.parametrize("precision, device_type", [("fp32", "cpu"), ("bf16", "cuda"), ("fp16", "cuda"), ("bf16", "cpu")])
def test_other_precisions_and_devices_leave_it_alone(matmul_precision, precision, device_type):
    assert use_tf32_for_fp32(precision, device_type) is False
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_fit_on_cpu_leaves_the_setting_alone(matmul_precision):
    torch.set_float32_matmul_precision("medium")  # whatever the user chose stays
    p = build_precision(torch.device("cpu"), amp=False, forced=None)
    assert p.name == "fp32"
    assert torch.get_float32_matmul_precision() == "medium"
    assert "TF32" not in p.reason
