"""ATSS anchor assignment, as in the official GLIP loss (docs/model.md §6; ``ATSSLossComputation.prepare_targets``).

For every ground-truth box g of an image:

1. candidates: on every pyramid level, the ``topk * A`` anchors (``A`` anchors per location; at
   most all of the level's anchors) whose centres are closest (L2) to g's centre;
2. threshold: ``thr_g = mean + std`` of the candidates' IoUs with g (legacy ``+1`` IoU; ``std``
   is the unbiased estimate, ``torch.std``'s default, as the official code);
3. a candidate is positive for g if its IoU >= ``thr_g`` and its centre lies inside g:
   ``min(cx - x1, cy - y1, x2 - cx, y2 - cy) > 0.01``;
4. an anchor that is positive for several boxes goes to the one with the highest IoU (the
   lowest box index among equal IoUs, as ``max`` picks).

Everything else is negative (-1). Anchors are shared by the images of a batch; the boxes of the
images are padded to a common count and the padding is masked out, so the whole batch is
assigned with a few tensor ops. Ties in the centre distance (common: a box centred between
anchors) are broken by the lower anchor index (a stable sort), so an assignment does not depend
on the batch it is computed in; the official ``topk`` leaves that order unspecified.
"""
from __future__ import annotations

from typing import Sequence

import torch

from model.box_ops import box_iou

CENTRE_INSIDE_EPS = 0.01


def pad_boxes(boxes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image boxes [G_i, 4] -> (boxes [B, G, 4] zero-padded, valid [B, G] bool), G = max G_i."""
    if len(boxes) == 0:
        raise ValueError("pad_boxes needs at least one image")
    g = max(int(b.shape[0]) for b in boxes)
    ref = boxes[0]
    out = torch.zeros(len(boxes), g, 4, dtype=torch.float32, device=ref.device)
    valid = torch.zeros(len(boxes), g, dtype=torch.bool, device=ref.device)
    for i, b in enumerate(boxes):
        if b.ndim != 2 or b.shape[-1] != 4:
            raise ValueError(f"boxes of image {i} have shape {tuple(b.shape)}, expected [G, 4]")
        out[i, : b.shape[0]] = b.to(torch.float32)
        valid[i, : b.shape[0]] = True
    return out, valid


def box_centres(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [..., 2] (cx, cy) = ((x1 + x2) / 2, (y1 + y2) / 2)."""
    return torch.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2], dim=-1)


@torch.no_grad()
def atss_assign(anchors: Sequence[torch.Tensor], gt_boxes: torch.Tensor, gt_valid: torch.Tensor | None = None,
                topk: int = 9, num_anchors_per_location: int = 1) -> torch.Tensor:
    """Match every anchor of every image to one ground-truth box, or to none.

    anchors: list over levels of [N_l, 4] xyxy (the same for every image; N = sum N_l).
    gt_boxes: [B, G, 4] xyxy in the anchors' frame (padded, see ``pad_boxes``).
    gt_valid: [B, G] bool, False for padding (default: all valid).
    topk: candidates per level per anchor location (official MODEL.ATSS.TOPK = 9).

    Returns [B, N] int64: the matched box index in [0, G), or -1 for a negative anchor.
    """
    if gt_boxes.ndim != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [B, G, 4], got {tuple(gt_boxes.shape)}")
    b, g = gt_boxes.shape[:2]
    all_anchors = torch.cat(list(anchors), dim=0).to(torch.float32)
    n = all_anchors.shape[0]
    device = all_anchors.device
    if g == 0:
        return torch.full((b, n), -1, dtype=torch.long, device=device)
    gt_boxes = gt_boxes.to(device=device, dtype=torch.float32)
    if gt_valid is None:
        gt_valid = torch.ones(b, g, dtype=torch.bool, device=device)
    gt_valid = gt_valid.to(device=device, dtype=torch.bool)

    flat_gt = gt_boxes.reshape(b * g, 4)
    ious = box_iou(all_anchors, flat_gt).view(n, b, g).permute(1, 0, 2)          # [B, N, G]
    anchor_ctr = box_centres(all_anchors)                                          # [N, 2]
    gt_ctr = box_centres(flat_gt)                                                  # [B*G, 2]
    dist = (anchor_ctr[:, None, :] - gt_ctr[None, :, :]).pow(2).sum(-1).sqrt()
    dist = dist.view(n, b, g).permute(1, 0, 2)                                     # [B, N, G]

    candidates, start = [], 0
    for level in anchors:
        n_l = int(level.shape[0])
        k = min(topk * num_anchors_per_location, n_l)
        order = torch.sort(dist[:, start:start + n_l], dim=1, stable=True).indices[:, :k]
        candidates.append(order + start)
        start += n_l
    candidates = torch.cat(candidates, dim=1)                                      # [B, K, G]

    cand_ious = ious.gather(1, candidates)                                         # [B, K, G]
    threshold = cand_ious.mean(dim=1) + cand_ious.std(dim=1)                       # [B, G]
    is_pos = cand_ious >= threshold[:, None, :]

    cand_ctr = anchor_ctr[candidates]                                              # [B, K, G, 2]
    cx, cy = cand_ctr[..., 0], cand_ctr[..., 1]
    x1, y1, x2, y2 = (gt_boxes[:, None, :, i] for i in range(4))                   # [B, 1, G]
    inside = torch.stack([cx - x1, cy - y1, x2 - cx, y2 - cy], dim=-1).amin(dim=-1) > CENTRE_INSIDE_EPS
    is_pos &= inside & gt_valid[:, None, :]

    # IoU of (anchor, box) where the anchor is a positive candidate of the box, else -inf.
    # A box's candidates are distinct anchors, so the scatter writes each cell at most once.
    neg_inf = torch.tensor(float("-inf"), device=device)
    matrix = torch.full((b, n, g), float("-inf"), device=device)
    matrix.scatter_(1, candidates, torch.where(is_pos, cand_ious, neg_inf))
    best, matched = matrix.max(dim=2)                                              # [B, N]
    matched[best == float("-inf")] = -1
    return matched


def atss_assign_single(anchors: Sequence[torch.Tensor], gt_boxes: torch.Tensor, topk: int = 9,
                       num_anchors_per_location: int = 1) -> torch.Tensor:
    """One image: anchors list of [N_l, 4], gt_boxes [G, 4] -> [N] matched box index or -1."""
    return atss_assign(anchors, gt_boxes[None], None, topk, num_anchors_per_location)[0]
