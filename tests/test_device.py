"""Device and precision selection (CUDA/MPS paths are checked by faking their availability)."""

import pytest
import torch

from mnistdiff import device as dev
from mnistdiff.device import DeviceError, auto_precision, select_device, select_precision

CPU = torch.device("cpu")


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert select_device("auto") == CPU
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert select_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")


def test_named_devices_are_validated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert select_device("cpu") == CPU
    with pytest.raises(DeviceError, match="CUDA is not available"):
        select_device("cuda")
    with pytest.raises(DeviceError, match="MPS is not available"):
        select_device("mps")
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        select_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="only 1 CUDA device"):
        select_device("cuda:3")


def test_auto_precision_per_device(monkeypatch):
    monkeypatch.setattr(dev, "_cpu_has_amx", lambda: False)
    assert auto_precision(CPU) == "fp32"
    monkeypatch.setattr(dev, "_cpu_has_amx", lambda: True)
    assert auto_precision(CPU) == "bf16"
    assert auto_precision(torch.device("mps")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert auto_precision(torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert auto_precision(torch.device("cuda")) == "fp16"


def test_select_precision_resolves_auto_and_rejects_bad_names(monkeypatch):
    monkeypatch.setattr(dev, "_cpu_has_amx", lambda: False)
    p = select_precision("auto", CPU)
    assert p.name == "fp32" and p.autocast_dtype is None and not p.grad_scaler
    bf16 = select_precision("bf16", CPU)
    assert bf16.autocast_dtype is torch.bfloat16 and not bf16.grad_scaler
    with pytest.raises(DeviceError, match="fp16 autocast is for GPUs"):
        select_precision("fp16", CPU)
    with pytest.raises(DeviceError, match="allowed: auto, fp32, bf16, fp16"):
        select_precision("fp64", CPU)


def test_bf16_autocast_runs_matmul_in_bf16_on_cpu():
    a = torch.randn(8, 8)
    with select_precision("bf16", CPU).autocast(CPU):
        assert (a @ a).dtype == torch.bfloat16
    with select_precision("fp32", CPU).autocast(CPU):
        assert (a @ a).dtype == torch.float32
