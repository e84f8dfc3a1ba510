"""Which parts of the teacher run in the low precision (bf16/fp16 autocast) and which stay fp32.

Plain bf16 autocast moves GLIP's dot-product logits by a few per cent (more on the coarse
levels), enough to reorder near-tied boxes. ``PrecisionPolicy`` names the modules kept in fp32;
``apply_policy`` wraps their ``forward`` so that it runs with autocast off and float32 inputs
(their outputs are float32; the next module casts again under autocast). Post-processing always
runs in fp32 (``model/postprocess`` casts the logits). ``benchmarks/precision.py`` measures the
label agreement of each policy with fp32; ``docs`` and the stage's default follow it.
"""
from __future__ import annotations

import enum
import functools

import torch
from torch import nn


class PrecisionPolicy(str, enum.Enum):
    AUTOCAST = "autocast"          # everything autocast allows in the low precision
    FP32_FUSION = "fp32_fusion"    # the vision-language attention (X-MHA) in fp32
    FP32_HEAD = "fp32_head"        # the whole VL head (fusion, text layers, DyConv, scoring) in fp32
    FP32_BACKBONE = "fp32_backbone"  # the image backbone (body + FPN) in fp32; text and head low
    FP32_BACKBONE_FUSION = "fp32_backbone_fusion"  # and the X-MHA: low are BERT, DyConv, scoring


def fp32_modules(model: nn.Module, policy: PrecisionPolicy) -> list[str]:
    """Names of the submodules ``policy`` keeps in fp32."""
    policy = PrecisionPolicy(policy)
    if policy is PrecisionPolicy.AUTOCAST:
        return []
    fusion = [n for n, _ in model.named_modules() if n.startswith("head.blocks.") and n.endswith(".fusion")]
    return {PrecisionPolicy.FP32_FUSION: fusion, PrecisionPolicy.FP32_HEAD: ["head"],
            PrecisionPolicy.FP32_BACKBONE: ["backbone"],
            PrecisionPolicy.FP32_BACKBONE_FUSION: ["backbone", *fusion]}[policy]


def _to_fp32(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    return value


def _device_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return value.device.type
    if isinstance(value, (list, tuple)):
        for v in value:
            found = _device_type(v)
            if found:
                return found
    return ""


def _fp32_forward(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        args, kwargs = _to_fp32(args), {k: _to_fp32(v) for k, v in kwargs.items()}
        with torch.autocast(_device_type(args) or "cpu", enabled=False):
            return forward(*args, **kwargs)
    run.fp32_policy = True
    return run


def apply_policy(model: nn.Module, policy: PrecisionPolicy) -> list[str]:
    """Keep ``policy``'s modules in fp32 (idempotent); returns their names."""
    names = fp32_modules(model, policy)
    for name in names:
        module = model.get_submodule(name)
        if not getattr(module.forward, "fp32_policy", False):
            module.forward = _fp32_forward(module.forward)
    return names
