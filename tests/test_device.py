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
    monkeypatch.setattr(dev, "_cpu_bf16_speedup", lambda: 2.0)
    monkeypatch.setattr(dev, "_cpu_has_native_bf16", lambda: False)
    assert auto_precision(CPU) == "fp32"
    monkeypatch.setattr(dev, "_cpu_has_native_bf16", lambda: True)
    assert auto_precision(CPU) == "bf16"
    assert auto_precision(torch.device("mps")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert auto_precision(torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert auto_precision(torch.device("cuda")) == "fp16"


def test_select_precision_resolves_auto_and_rejects_bad_names(monkeypatch):
    monkeypatch.setattr(dev, "_cpu_has_native_bf16", lambda: False)
    p = select_precision("auto", CPU)
    assert p.name == "fp32" and p.autocast_dtype is None and not p.grad_scaler
    with pytest.warns(UserWarning, match="bf16 matmul is emulated"):
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


def test_native_bf16_probe_reads_amx_and_avx512_bf16(monkeypatch):
    monkeypatch.setattr(dev, "_cpu_bf16_speedup", lambda: 2.0)
    for amx, avx512 in [(False, False), (True, False), (False, True)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a, raising=False)
        monkeypatch.setattr(
            torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v, raising=False
        )
        assert dev._cpu_has_native_bf16() == (amx or avx512)
        assert auto_precision(CPU) == ("bf16" if amx or avx512 else "fp32")


def test_auto_needs_a_measured_bf16_speedup(monkeypatch):
    monkeypatch.setattr(dev, "_cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(dev, "_cpu_bf16_speedup", lambda: 0.5)  # AVX-512 BF16 Xeon: slower
    assert auto_precision(CPU) == "fp32"
    monkeypatch.setattr(dev, "_cpu_bf16_speedup", lambda: dev.BF16_MIN_SPEEDUP)
    assert auto_precision(CPU) == "bf16"


def test_bf16_speedup_probe_is_the_ratio_of_best_times_and_cached(monkeypatch):
    """Fake clock: five timed fp32 matmuls, then five bf16 ones; the probe divides the best
    (smallest) fp32 time by the best bf16 time, once per process."""
    fp32_ms, bf16_ms = [5, 4, 6, 4, 7], [3, 2, 2, 5, 2.5]
    ticks, now = [], 0.0
    for ms in fp32_ms + bf16_ms:
        ticks += [now, now + ms / 1000]
        now += 1.0
    clock = iter(ticks)
    monkeypatch.setattr(dev.time, "perf_counter", lambda: next(clock))
    dev._cpu_bf16_speedup.cache_clear()
    try:
        assert dev._cpu_bf16_speedup() == pytest.approx(4 / 2)
        assert next(clock, None) is None  # every tick used: 5 timings per precision
        assert dev._cpu_bf16_speedup() == pytest.approx(2.0)  # cached: no clock read left
    finally:
        dev._cpu_bf16_speedup.cache_clear()


def test_forced_bf16_on_native_cpu_does_not_warn(monkeypatch, recwarn):
    monkeypatch.setattr(dev, "_cpu_has_native_bf16", lambda: True)
    assert select_precision("bf16", CPU).autocast_dtype is torch.bfloat16
    assert not [w for w in recwarn if "emulated" in str(w.message)]
