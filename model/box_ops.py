"""Box utilities in the official GLIP (maskrcnn-benchmark) conventions. Pure functions.

Boxes are absolute pixel ``xyxy`` tensors [..., 4]. "Legacy" means the maskrcnn-benchmark
``TO_REMOVE = 1`` convention: a box covers pixels x1..x2 inclusive, so its width is
``x2 - x1 + 1`` (IoU, box coding, clipping to ``[0, W - 1]``). The GIoU of the loss is the
official one, which does NOT use ``+1``. Image sizes are ``(height, width)``.
"""
from __future__ import annotations

import enum
import math

import torch

TO_REMOVE = 1.0
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class BoxConvention(str, enum.Enum):
    """How a box's far edge relates to its width: the project's one name for it (readers,
    exporters and these functions all take it)."""
    LEGACY = "legacy"            # x2 = x + w - 1 (official GLIP, maskrcnn_benchmark TO_REMOVE = 1)
    CONTINUOUS = "continuous"    # x2 = x + w


def convention_offset(convention: BoxConvention | str) -> float:
    """What ``x2 - x1`` lacks of the width: 1 for legacy, 0 for continuous."""
    return TO_REMOVE if BoxConvention(convention) is BoxConvention.LEGACY else 0.0


def xywh_to_xyxy(boxes: torch.Tensor, convention: BoxConvention = BoxConvention.LEGACY) -> torch.Tensor:
    """[..., 4] (x, y, w, h) -> (x1, y1, x2, y2); legacy: x2 = x + w - 1 (MDETR/maskrcnn loaders)."""
    x, y, w, h = boxes.unbind(-1)
    r = convention_offset(convention)
    return torch.stack([x, y, x + w - r, y + h - r], dim=-1)


def xyxy_to_xywh(boxes: torch.Tensor, convention: BoxConvention = BoxConvention.LEGACY) -> torch.Tensor:
    """[..., 4] (x1, y1, x2, y2) -> (x, y, w, h); legacy: w = x2 - x1 + 1."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    r = convention_offset(convention)
    return torch.stack([x1, y1, x2 - x1 + r, y2 - y1 + r], dim=-1)


def box_area(boxes: torch.Tensor, convention: BoxConvention = BoxConvention.LEGACY) -> torch.Tensor:
    """[..., 4] -> [...]"""
    r = convention_offset(convention)
    return (boxes[..., 2] - boxes[..., 0] + r) * (boxes[..., 3] - boxes[..., 1] + r)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise legacy IoU (official ``boxlist_iou``): [N, 4], [M, 4] -> [N, M]."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt + TO_REMOVE).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def elementwise_giou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """GIoU of matched pairs as in the official ATSS loss: [N, 4], [N, 4] -> [N].

    Areas without ``+1``; the predicted x2/y2 are first raised to at least x1/y1; ``eps`` is
    added to the union and to the enclosing area (official ``GIoULoss``; loss = 1 - giou).
    """
    px1, py1, px2, py2 = pred.unbind(-1)
    px2, py2 = torch.max(px1, px2), torch.max(py1, py2)
    tx1, ty1, tx2, ty2 = target.unbind(-1)
    pred_area = (px2 - px1) * (py2 - py1)
    target_area = (tx2 - tx1) * (ty2 - ty1)
    iw = torch.min(px2, tx2) - torch.max(px1, tx1)
    ih = torch.min(py2, ty2) - torch.max(py1, ty1)
    inter = torch.where((iw > 0) & (ih > 0), iw * ih, torch.zeros_like(iw))
    enclosing = (torch.max(px2, tx2) - torch.min(px1, tx1)) * (torch.max(py2, ty2) - torch.min(py1, ty1)) + eps
    union = pred_area + target_area - inter + eps
    iou = inter / union
    return iou - (enclosing - union) / enclosing


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (continuous convention, DETR's): [N, 4], [M, 4] -> [N, M]."""
    area1 = box_area(boxes1, BoxConvention.CONTINUOUS)
    area2 = box_area(boxes2, BoxConvention.CONTINUOUS)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    lt_c = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb_c = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh_c = (rb_c - lt_c).clamp(min=0)
    enclosing = wh_c[..., 0] * wh_c[..., 1]
    return inter / union - (enclosing - union) / enclosing


def clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Clamp [..., 4] boxes into an image of (height, width): x in [0, W-1], y in [0, H-1]."""
    h, w = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1.clamp(0, w - TO_REMOVE), y1.clamp(0, h - TO_REMOVE),
                        x2.clamp(0, w - TO_REMOVE), y2.clamp(0, h - TO_REMOVE)], dim=-1)


def rescale_boxes(boxes: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """Map [..., 4] boxes from an image of ``from_size`` (h, w) to one of ``to_size`` (h, w).

    Official ``BoxList.resize``: coordinates multiplied by to/from ratios, no ``+1`` shifts.
    """
    ratio_h = float(to_size[0]) / float(from_size[0])
    ratio_w = float(to_size[1]) / float(from_size[1])
    if ratio_h == ratio_w:
        return boxes * ratio_w
    scale = boxes.new_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    return boxes * scale


class BoxCoder:
    """Anchor-relative box deltas, official ATSS/GLIP coder (legacy widths, weights 10,10,5,5)."""

    def __init__(self, weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 bbox_xform_clip: float = BBOX_XFORM_CLIP):
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """boxes, anchors: [N, 4] xyxy -> deltas [N, 4] (dx, dy, dw, dh)."""
        wx, wy, ww, wh = self.weights
        ex_w = anchors[:, 2] - anchors[:, 0] + TO_REMOVE
        ex_h = anchors[:, 3] - anchors[:, 1] + TO_REMOVE
        ex_cx = (anchors[:, 2] + anchors[:, 0]) / 2
        ex_cy = (anchors[:, 3] + anchors[:, 1]) / 2
        gt_w = boxes[:, 2] - boxes[:, 0] + TO_REMOVE
        gt_h = boxes[:, 3] - boxes[:, 1] + TO_REMOVE
        gt_cx = (boxes[:, 2] + boxes[:, 0]) / 2
        gt_cy = (boxes[:, 3] + boxes[:, 1]) / 2
        return torch.stack([wx * (gt_cx - ex_cx) / ex_w, wy * (gt_cy - ex_cy) / ex_h,
                            ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)], dim=1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """deltas: [N, 4k], anchors: [N, 4] -> boxes [N, 4k] xyxy, in the deltas' dtype.

        dw, dh are clamped at log(1000/16) before the exp; box = centre ± 0.5 (size - 1).
        """
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = anchors[:, 2] - anchors[:, 0] + TO_REMOVE
        heights = anchors[:, 3] - anchors[:, 1] + TO_REMOVE
        ctr_x = (anchors[:, 2] + anchors[:, 0]) / 2
        ctr_y = (anchors[:, 3] + anchors[:, 1]) / 2
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.bbox_xform_clip)
        pred_cx = dx * widths[:, None] + ctr_x[:, None]
        pred_cy = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        boxes = torch.stack([pred_cx - 0.5 * (pred_w - 1), pred_cy - 0.5 * (pred_h - 1),
                             pred_cx + 0.5 * (pred_w - 1), pred_cy + 0.5 * (pred_h - 1)], dim=-1)
        return boxes.reshape(deltas.shape)
