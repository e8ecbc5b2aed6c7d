"""Device and precision selection: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from dataclasses import dataclass

import torch


class DeviceError(RuntimeError):
    """The requested device or precision is not available here."""


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; otherwise validate the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"{name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not _mps_available():
        raise DeviceError("device 'mps' requested but Apple MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device type {device.type!r}; use cpu, cuda or mps")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@dataclass(frozen=True)
class Precision:
    """How to run the forward pass: autocast dtype (None = fp32) and whether to scale grads."""

    name: str
    autocast_dtype: torch.dtype | None
    grad_scaler: bool

    def autocast(self, device: torch.device):
        """The autocast context for ``device`` (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def auto_precision(device: torch.device) -> str:
    """The fastest safe precision for ``device``: bf16 on CUDA when supported (else fp16),
    bf16 on CPUs whose bf16 matmul is measurably faster than fp32, fp32 elsewhere (MPS)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and _cpu_has_native_bf16() and _cpu_bf16_speedup() >= BF16_MIN_SPEEDUP:
        return "bf16"
    return "fp32"


# Native bf16 instructions are necessary but not sufficient: on an Intel Xeon with AVX-512 BF16
# (no AMX) bf16 matmul ran at half the fp32 rate, on an AMD EPYC with it at 2.2x (README).
BF16_MIN_SPEEDUP = 1.25
PROBE_SIZE = 256


def _cpu_has_native_bf16() -> bool:
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


@functools.lru_cache(maxsize=1)
def _cpu_bf16_speedup() -> float:
    """fp32 / bf16 time of a 256-square matmul, best of 5 (about a millisecond)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, PROBE_SIZE, PROBE_SIZE, generator=g)

    def best_seconds(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        return max(min(times), 1e-9)

    return best_seconds(torch.float32) / best_seconds(torch.bfloat16)


def select_precision(name: str, device: torch.device) -> Precision:
    """Resolve ``auto | fp32 | bf16 | fp16`` for ``device``; fp16 uses a GradScaler (CUDA only).

    Parameters stay fp32 in every mode (autocast computes in low precision).
    """
    if name == "auto":
        name = auto_precision(device)
    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("this CUDA device has no bf16 support; use precision fp16 or fp32")
        if device.type == "cpu" and not _cpu_has_native_bf16():
            warnings.warn(
                "precision bf16 on a CPU without AMX or AVX-512 BF16: bf16 matmul is emulated "
                "and can be hundreds of times slower than fp32; use precision auto or fp32",
                stacklevel=2,
            )
        return Precision("bf16", torch.bfloat16, False)
    if name == "fp16":
        if device.type == "cpu":
            raise DeviceError("fp16 autocast is for GPUs; on CPU use precision bf16 or fp32")
        return Precision("fp16", torch.float16, device.type == "cuda")
    raise DeviceError(f"unknown precision {name!r}; allowed: auto, fp32, bf16, fp16")


def describe(device: torch.device, precision: Precision) -> str:
    """One line for the log: the chosen device and compute dtype."""
    extra = ""
    if device.type == "cuda":
        extra = f" ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        extra = f" ({torch.get_num_threads()} threads)"
    return f"device: {device}{extra}, precision: {precision.name}"
