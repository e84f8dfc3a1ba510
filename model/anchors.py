"""Anchors of the official GLIP/ATSS head (docs/model.md §5): one square anchor per location and level.

Cell anchors follow Detectron's legacy generator (``+1`` widths, anchors centred on
``(stride - 1) / 2``): for stride 8 and size 64 the cell anchor is ``[-28, -28, 35, 35]``.
They are persistent buffers ``cell_anchors.{l}`` of shape [A, 4] (official
``rpn.anchor_generator.cell_anchors.{l}``), so a converted checkpoint carries them.
"""
from __future__ import annotations

import torch
from torch import nn

from model.config import AnchorConfig


def _mkanchors(ws: torch.Tensor, hs: torch.Tensor, x_ctr: float, y_ctr: float) -> torch.Tensor:
    """Boxes [K, 4] of widths/heights ``ws``/``hs`` around a centre (legacy ``w - 1`` extent)."""
    return torch.stack([x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                        x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)], dim=1)


def _whctrs(anchor: torch.Tensor) -> tuple[float, float, float, float]:
    w = float(anchor[2] - anchor[0] + 1)
    h = float(anchor[3] - anchor[1] + 1)
    return w, h, float(anchor[0]) + 0.5 * (w - 1), float(anchor[1]) + 0.5 * (h - 1)


def generate_cell_anchors(stride: int, sizes: tuple[float, ...],
                          aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """Cell anchors [len(ratios) * len(sizes), 4] float32, as the official ``generate_anchors``.

    Reference window ``[0, 0, stride - 1, stride - 1]``; each aspect ratio keeps its area with
    round-half-even rounding of the sides (numpy's ``np.round`` = ``torch.round``), then each
    ratio window is scaled by ``size / stride``. Computed in float64 like the numpy original.
    """
    f64 = torch.float64
    base = torch.tensor([0.0, 0.0, stride - 1.0, stride - 1.0], dtype=f64)
    ratios = torch.tensor(aspect_ratios, dtype=f64)
    scales = torch.tensor(sizes, dtype=f64) / stride
    w, h, x_ctr, y_ctr = _whctrs(base)
    ws = torch.round(torch.sqrt(w * h / ratios))
    hs = torch.round(ws * ratios)
    ratio_anchors = _mkanchors(ws, hs, x_ctr, y_ctr)
    out = []
    for anchor in ratio_anchors:
        w, h, x_ctr, y_ctr = _whctrs(anchor)
        out.append(_mkanchors(w * scales, h * scales, x_ctr, y_ctr))
    return torch.cat(out, dim=0).float()


class _BufferList(nn.Module):
    """Buffers named ``0``, ``1``, ... (keeps the official ``cell_anchors.{l}`` names)."""

    def __init__(self, buffers: list[torch.Tensor]):
        super().__init__()
        for i, buf in enumerate(buffers):
            self.register_buffer(str(i), buf)

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self):
        return iter(self._buffers.values())


class AnchorGenerator(nn.Module):
    """Anchors for every level of the pyramid (the same for every image of a batch)."""

    def __init__(self, cfg: AnchorConfig):
        super().__init__()
        if len(cfg.sizes) != len(cfg.strides):
            raise ValueError(f"anchors.sizes {cfg.sizes} and anchors.strides {cfg.strides} "
                             "must have the same length")
        self.strides = tuple(int(s) for s in cfg.strides)
        self.cell_anchors = _BufferList([
            generate_cell_anchors(stride, (float(size),), tuple(cfg.aspect_ratios))
            for stride, size in zip(self.strides, cfg.sizes)])

    def num_anchors_per_location(self) -> int:
        return len(next(iter(self.cell_anchors)))

    def forward(self, features: list[torch.Tensor],
                padded_image_size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """features: list over levels of [B, C, H_l, W_l].

        Returns a list over levels of [H_l * W_l * A, 4] float32 xyxy anchors, ordered
        (y, x, anchor) like the head's flattened outputs; anchor (y, x, a) is
        ``cell_anchors[l][a] + (x * s_l, y * s_l, x * s_l, y * s_l)``.
        ``padded_image_size`` is part of the call contract but not needed: anchors depend only
        on the feature grids and strides (the official code clips nothing here).
        """
        if len(features) != len(self.strides):
            raise ValueError(f"got {len(features)} feature levels, the anchor generator has "
                             f"{len(self.strides)} strides")
        anchors = []
        for feat, stride, cell in zip(features, self.strides, self.cell_anchors):
            height, width = feat.shape[-2:]
            device = feat.device
            shifts_x = torch.arange(0, width * stride, step=stride, dtype=torch.float32, device=device)
            shifts_y = torch.arange(0, height * stride, step=stride, dtype=torch.float32, device=device)
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            cell = cell.to(device=device, dtype=torch.float32)
            anchors.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
        return anchors
