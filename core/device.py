"""Devices and numeric precision: the one place that says what ``auto`` means.

``Device.AUTO`` is CUDA when this process can see a GPU, else the CPU. ``Precision.AUTO`` is
bfloat16 autocast on CUDA and float32 elsewhere. Configs hold the enums; code that runs calls
``resolve_device`` / ``resolve_precision`` once, at set-up, and keeps the result.
"""
from __future__ import annotations

import contextlib
import enum

import torch

__all__ = ["Device", "Precision", "resolve_device", "resolve_precision", "autocast_dtype", "autocast"]


class Device(str, enum.Enum):
    AUTO = "auto"      # CUDA when this process sees a GPU, else CPU
    CPU = "cpu"
    CUDA = "cuda"


class Precision(str, enum.Enum):
    AUTO = "auto"      # bf16 autocast on CUDA, float32 elsewhere
    FP32 = "fp32"
    BF16 = "bf16"      # autocast bfloat16, no loss scaling
    FP16 = "fp16"      # autocast float16 (+ GradScaler when training; GPUs)


def resolve_device(device: Device | str) -> torch.device:
    """``auto`` → ``cuda`` if available else ``cpu``; anything else as given (``cuda:1`` works)."""
    value = device.value if isinstance(device, Device) else str(device)
    if value == Device.AUTO.value:
        value = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(value)


def resolve_precision(precision: Precision | str, device: torch.device) -> Precision:
    """``auto`` → BF16 on CUDA, FP32 elsewhere; any other value unchanged."""
    precision = Precision(precision)
    if precision is Precision.AUTO:
        return Precision.BF16 if device.type == "cuda" else Precision.FP32
    return precision


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for float32)."""
    return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(Precision(precision))


def autocast(device: torch.device, precision: Precision):
    """A context that runs the enclosed ops in ``precision`` (a no-op for float32)."""
    dtype = autocast_dtype(resolve_precision(precision, device))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
