"""DyConv: the vision part of a VL-DyHead block (docs/model.md §4.4, official ``vldyhead.DyConv``).

Per level l: three modulated deformable 3x3 convs + GroupNorm look at the level itself
(``convs[1]``), the level below at stride 2 (``convs[2]``) and the level above (``convs[0]``,
then bilinearly upsampled with ``align_corners=True``). All three use the offsets/mask
predicted at level l, even the upper branch whose output is smaller: the official CUDA kernel
reads that memory as if it had the upper level's size. ``upper_level_offset`` reproduces it.
The branches are fused with scale-aware attention (h_sigmoid of a pooled 1x1 conv), then DyReLU.

State-dict names: ``convs.{k}.conv.{weight,bias}``, ``convs.{k}.norm.{weight,bias}``
(official ``DyConv.{k}.conv`` / ``.bn``), ``scale_attn.1`` (``AttnConv.1``), ``dyrelu.fc.{0,2}``
(``relu.fc.{0,2}``), ``offset``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.deform_conv import modulated_deform_conv2d

KERNEL_TAPS = 9   # 3x3


def h_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3) / 6


class HSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return h_sigmoid(x)


def upper_level_offset(offset: torch.Tensor, mask: torch.Tensor,
                       size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-interpret level-l offsets/mask for a conv whose output is ``size`` (docs/model.md §4.4).

    offset: [B, 18, H, W], mask: [B, 9, H, W] computed at level l. The official kernel reads
    ``offset[b]`` / ``mask[b]`` memory as [18, h, w] / [9, h, w]: the first ``18·h·w`` values of
    each image's (channel, y, x)-ordered block. Returns ([B, 18, h, w], [B, 9, h, w]).
    Same size: returned unchanged. A larger ``size`` has no meaning (the kernel would read past
    the tensor) and raises.
    """
    b, _, height, width = offset.shape
    h, w = size
    if (h, w) == (height, width):
        return offset, mask
    if h * w > height * width:
        raise ValueError(f"cannot reuse offsets of a {height}x{width} level for a {h}x{w} output")
    offset = offset.reshape(b, -1)[:, :2 * KERNEL_TAPS * h * w].reshape(b, 2 * KERNEL_TAPS, h, w)
    mask = mask.reshape(b, -1)[:, :KERNEL_TAPS * h * w].reshape(b, KERNEL_TAPS, h, w)
    return offset, mask


class ModulatedDeformConv3x3(nn.Module):
    """3x3 modulated deformable conv (padding 1), run in float32 like the official op."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        stdv = 1.0 / math.sqrt(in_channels * KERNEL_TAPS)
        nn.init.uniform_(self.weight, -stdv, stdv)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return (height - 1) // self.stride + 1, (width - 1) // self.stride + 1

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [B, Cin, H, W]; offset: [B, 18, H', W'] interleaved (dy, dx) per tap; mask: [B, 9, H', W']
        with (H', W') the output size. Returns [B, Cout, H', W'] float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return modulated_deform_conv2d(x.float(), offset.float(), mask.float(), self.weight.float(),
                                           self.bias.float(), stride=self.stride, padding=1)


class DeformConvNorm(nn.Module):
    """Deformable conv + GroupNorm (official ``Conv3x3Norm``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.conv = ModulatedDeformConv3x3(in_channels, out_channels, stride)
        self.norm = nn.GroupNorm(groups, out_channels)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        offset, mask = upper_level_offset(offset, mask, self.conv.output_size(*x.shape[-2:]))
        return self.norm(self.conv(x, offset, mask))


class DyReLU(nn.Module):
    """Dynamic ReLU-B (K=2, with bias): out = max(x·a1 + b1, x·a2 + b2), coefficients from the
    globally pooled input (official ``layers/dyrelu.py``, lambda_a = 2, init_a = (1, 0))."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, 4 * channels), HSigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]"""
        b, c = x.shape[:2]
        y = self.fc(F.adaptive_avg_pool2d(x, 1).view(b, c)).view(b, 4 * c, 1, 1)
        a1, b1, a2, b2 = torch.split(y, self.channels, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        b1 = b1 - 0.5
        b2 = b2 - 0.5
        return torch.max(x * a1 + b1, x * a2 + b2)


class DyConv(nn.Module):
    """Scale- and spatial-aware update of every pyramid level; weights shared across levels."""

    def __init__(self, channels: int = 256, groups: int = 16):
        super().__init__()
        self.convs = nn.ModuleList([DeformConvNorm(channels, channels, 1, groups),   # from level l+1
                                    DeformConvNorm(channels, channels, 1, groups),   # level l
                                    DeformConvNorm(channels, channels, 2, groups)])  # from level l-1
        self.scale_attn = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, kernel_size=1),
                                        nn.ReLU(inplace=True))
        self.dyrelu = DyReLU(channels)
        self.offset = nn.Conv2d(channels, 3 * KERNEL_TAPS, kernel_size=3, padding=1)
        nn.init.normal_(self.scale_attn[1].weight, 0.0, 0.01)
        nn.init.zeros_(self.scale_attn[1].bias)

    def forward(self, visual: list[torch.Tensor]) -> list[torch.Tensor]:
        """visual: list over levels of [B, C, H_l, W_l] -> same shapes."""
        out = []
        for level, x in enumerate(visual):
            offset_mask = self.offset(x)
            # torchvision's deform_conv2d has crashed the process on NaN offsets: keep a diverged
            # step a NaN loss (caught by the trainer) instead of a segfault
            offset = offset_mask[:, :2 * KERNEL_TAPS].nan_to_num()
            mask = offset_mask[:, 2 * KERNEL_TAPS:].sigmoid()
            branches = [self.convs[1](x, offset, mask)]
            if level > 0:
                branches.append(self.convs[2](visual[level - 1], offset, mask))
            if level < len(visual) - 1:
                upper = self.convs[0](visual[level + 1], offset, mask)
                branches.append(F.interpolate(upper, size=tuple(x.shape[-2:]), mode="bilinear",
                                              align_corners=True))
            stacked = torch.stack(branches)                                      # [K, B, C, H, W]
            weights = h_sigmoid(torch.stack([self.scale_attn(f) for f in branches]))  # [K, B, 1, 1, 1]
            out.append(torch.mean(stacked * weights, dim=0))
        return [self.dyrelu(x) for x in out]
