"""FPN with P6/P7 (RetinaNet style), exactly as the official GLIP ``SWINT-FPN-RETINANET`` (docs/model.md §2).

Names are ours; the official ones are off by one (checkpoint.py maps them):
``lateral.{0,1,2}`` = ``fpn_inner{2,3,4}`` (1x1 on C3/C4/C5), ``output.{0,1,2}`` = ``fpn_layer{2,3,4}``
(3x3), ``p6``/``p7`` = ``top_blocks.p6``/``top_blocks.p7``.

* top-down: nearest interpolation to the lateral's size (not x2), added to the lateral;
* P6 = conv3x3/s2(P5) (the official uses P5 because in == out channels), P7 = conv3x3/s2(ReLU(P6));
* DropBlock on the merged P3/P4 maps before their 3x3 conv, in train mode only;
* convs have a bias, kaiming_uniform(a=1) weights, zero bias, no norm, no activation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropBlock2D(nn.Module):
    """The official DropBlock (layers/dropblock.py): gamma = p / size², blocks zeroed, rescaled."""

    def __init__(self, drop_prob: float, block_size: int):
        super().__init__()
        self.drop_prob, self.block_size = drop_prob, block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> same shape; identity in eval mode or with drop_prob 0."""
        if not self.training or self.drop_prob == 0.0:
            return x
        gamma = self.drop_prob / self.block_size ** 2
        seed = (torch.rand(x.shape[0], *x.shape[2:], device=x.device) < gamma).to(x.dtype)
        block = F.max_pool2d(seed[:, None], kernel_size=self.block_size, stride=1,
                             padding=self.block_size // 2)
        if self.block_size % 2 == 0:
            block = block[:, :, :-1, :-1]
        keep = 1 - block[:, 0]
        return x * keep[:, None] * (keep.numel() / keep.sum())


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int = 256,
                 drop_block_prob: float = 0.3, drop_block_size: int = 3):
        """in_channels: channels of C3, C4, C5."""
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"FPN expects C3, C4, C5 channels, got {in_channels}")
        self.lateral = nn.ModuleList(_conv(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(_conv(out_channels, out_channels, 3) for _ in in_channels)
        self.p6 = _conv(out_channels, out_channels, 3, stride=2)
        self.p7 = _conv(out_channels, out_channels, 3, stride=2)
        self.drop_block = DropBlock2D(drop_block_prob, drop_block_size) if drop_block_prob > 0 else None

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """[C3, C4, C5] -> [P3, P4, P5, P6, P7], each [B, out_channels, H_l, W_l]."""
        c3, c4, c5 = feats
        last = self.lateral[2](c5)
        results = [self.output[2](last)]
        for i, c in ((1, c4), (0, c3)):
            lateral = self.lateral[i](c)
            top_down = last if lateral.shape[-2:] == last.shape[-2:] else \
                F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            last = lateral + top_down
            merged = self.drop_block(last) if self.drop_block is not None and self.training else last
            results.insert(0, self.output[i](merged))
        p6 = self.p6(results[-1])
        p7 = self.p7(F.relu(p6))
        return results + [p6, p7]
