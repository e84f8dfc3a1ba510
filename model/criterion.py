"""The GLIP training objective (docs/model.md §6; official ``ATSSLossComputation`` with the dot-product token loss).

``GLIPCriterion`` is separate from the network, like DETR's ``SetCriterion``: it takes the
network's output dict and per-image targets, assigns anchors with ATSS (model/atss.py) and
returns a dict of named, unweighted losses. ``weight_dict`` holds the official weights
(``loss_reg`` x ``reg_loss_weight`` = 2.0, the others x 1.0); ``total`` applies them, so the
official total is ``criterion.total(losses)``.

Losses, for a batch of B images, N anchors, T tokens:

* ``loss_token``: sigmoid focal loss (fvcore form, alpha 0.25, gamma 2) over every
  (anchor, token) pair whose token is a real one (text mask = 1, [CLS]/[SEP]/"." included),
  summed, / ``num_pos_avg`` = max(positives over all workers / world size, 1).
  Target row of a positive anchor = its box's binary token map (all zero when the box's spans
  map to no token: the anchor still counts as a positive for the other two losses). Negative
  anchors: all zero, plus the official "NoObj" one-hot at the last token slot, but only when the
  text is ``noobj_num_tokens`` (256) tokens wide, the official padded width: the slot counts
  only if that token is real, i.e. a caption that fills all 256 tokens. With prompts padded to
  the longest of the batch (T < 256) no caption reaches 256 tokens, so the official slot would
  be masked out and no NoObj target is set: both paddings give the official loss.
  A target may carry ``ignore_tokens`` [T] bool: those tokens take no token loss in that image
  (a pseudo caption's phrases the teacher found no box for; not in the official code).
* A target may carry ``ignore_regions`` [K, 4] xyxy: objects known to be there but not labelled
  (a pseudo caption's boxes of classes the gold sets label, left out of the targets). ATSS
  assigns over the boxes and the regions together; an anchor it gives a region takes no loss at
  all (no token loss for any token, not a positive, not counted in ``num_pos_avg``), so the
  object is taught neither as its phrase nor as background (not in the official code).
* A target may carry ``box_loss``: a bool scalar, False for an image whose boxes teach the
  token loss only (a teacher's boxes, less precise than its words): its positive anchors count in
  ``num_pos_avg`` and take token loss, but no regression or centerness loss; those two are then
  normalised by the positives that do take them (not in the official code; unset everywhere =
  official).
* ``loss_reg``: GIoU loss (1 - GIoU, official form without ``+1``) between the decoded
  predictions of the positive anchors and their boxes, weighted by the centerness target,
  summed, / (sum of centerness targets, averaged over workers). The box is taken as the
  official code does, encoded against the anchor and decoded again.
* ``loss_centerness``: BCE with logits against sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)),
  l,t,r,b measured from the anchor centre to the box sides, summed, / ``num_pos_avg``.

Everything is computed in float32 with autocast disabled, whatever precision the network ran in.
With no positive anchor the two box losses are 0 (still attached to the graph). The official
GIoU loss falls back to an unweighted sum when the centerness weights sum to 0; positives always
have centerness > 0 (their centre is inside the box by > 0.01), so that branch is not kept.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.atss import atss_assign, pad_boxes
from model.box_ops import BoxCoder, elementwise_giou
from model.config import LossConfig
from model.prompts import positive_map

NOOBJ_NUM_TOKENS = 256


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Element-wise sigmoid focal loss, fvcore form: [...] logits, [...] 0/1 targets -> [...].

    loss = alpha_t * (1 - p_t)^gamma * BCE(logits, targets), p_t = p if target else 1 - p,
    alpha_t = alpha if target else 1 - alpha (no alpha weighting when alpha < 0).
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def centerness_targets(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """boxes, anchors: [P, 4] xyxy -> [P] sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)), measured
    from each anchor's centre to its box's sides (0 where the centre is not inside the box)."""
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack([cx - boxes[:, 0], boxes[:, 2] - cx], dim=1)
    tb = torch.stack([cy - boxes[:, 1], boxes[:, 3] - cy], dim=1)
    ratio = (lr.amin(1) / lr.amax(1)) * (tb.amin(1) / tb.amax(1))
    return torch.sqrt(ratio.clamp(min=0))


def flatten_predictions(outputs: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network's per-level outputs -> all levels concatenated, in float32:
    token logits [B, N, T], box regression [B, N, 4], centerness logits [B, N], anchors [N, 4],
    anchor order (level, y, x, a) as the anchor generator's."""
    logits = torch.cat([lg.float() for lg in outputs["token_logits"]], dim=1)
    regression, centerness = [], []
    for reg, ctr in zip(outputs["box_regression"], outputs["centerness"]):
        b, a4, h, w = reg.shape
        regression.append(reg.float().reshape(b, a4 // 4, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        centerness.append(ctr.float().permute(0, 2, 3, 1).reshape(b, -1))
    anchors = torch.cat([an.float() for an in outputs["anchors"]], dim=0)
    return logits, torch.cat(regression, dim=1), torch.cat(centerness, dim=1), anchors


def token_targets(positive_maps: torch.Tensor, matched: torch.Tensor,
                  noobj_num_tokens: int = NOOBJ_NUM_TOKENS) -> torch.Tensor:
    """positive_maps [B, G, T] (non-zero = the box grounds the token), matched [B, N] (box index
    or -1) -> binary token targets [B, N, T] float32: a positive anchor takes its box's row, a
    negative anchor zeros, plus the NoObj one-hot at T - 1 when T == ``noobj_num_tokens``."""
    b, g, t = positive_maps.shape
    n = matched.shape[1]
    if g == 0:
        targets = positive_maps.new_zeros(b, n, t, dtype=torch.float32)
    else:
        binary = (positive_maps > 0).to(torch.float32)
        targets = binary[torch.arange(b, device=matched.device)[:, None], matched.clamp(min=0)]
        targets = targets * (matched >= 0)[..., None]
    if t == noobj_num_tokens:
        targets[..., -1] = torch.where(matched >= 0, targets[..., -1], torch.ones_like(targets[..., -1]))
    return targets


def _sum_over_workers(value: torch.Tensor) -> torch.Tensor:
    """all_reduce(SUM) of a tensor when torch.distributed is initialised (else the value)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GLIPCriterion(nn.Module):
    """ATSS + token focal loss + GIoU + centerness (docs/model.md §6). No parameters."""

    def __init__(self, cfg: LossConfig, box_coder: BoxCoder | None = None,
                 noobj_num_tokens: int = NOOBJ_NUM_TOKENS):
        super().__init__()
        self.topk = cfg.atss_topk
        self.alpha = cfg.focal_alpha
        self.gamma = cfg.focal_gamma
        self.box_coder = box_coder or BoxCoder()
        self.noobj_num_tokens = noobj_num_tokens
        self.weight_dict = {"loss_token": 1.0, "loss_reg": float(cfg.reg_loss_weight), "loss_centerness": 1.0}

    def total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the named losses (official total = token + 2.0 reg + centerness)."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)

    @torch.no_grad()
    def assign(self, anchors: Sequence[torch.Tensor], targets: Sequence[Mapping]) -> torch.Tensor:
        """ATSS for the batch: anchors list over levels of [N_l, 4]; targets per image with
        ``boxes`` [G_i, 4] -> [B, N] matched box index (into that image's boxes) or -1."""
        boxes, valid = pad_boxes([t["boxes"] for t in targets])
        return atss_assign(anchors, boxes, valid, self.topk)

    def forward(self, outputs: Mapping, targets: Sequence[Mapping], text_mask: torch.Tensor) -> dict:
        """outputs: the network's dict (``token_logits`` list of [B, N_l, T], ``box_regression``
        list of [B, 4A, H_l, W_l], ``centerness`` list of [B, A, H_l, W_l], ``anchors`` list of
        [N_l, 4]). targets: per image {``boxes``: [G, 4] xyxy in the network-input frame,
        ``positive_map``: [G, T] binary token map, optional ``ignore_tokens``: [T] bool}.
        text_mask: [B, T] attention mask (1 = token).

        Returns {"loss_token", "loss_reg", "loss_centerness"}: unweighted scalar tensors.
        """
        device_type = outputs["token_logits"][0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._losses(outputs, targets, text_mask)

    def _losses(self, outputs: Mapping, targets: Sequence[Mapping], text_mask: torch.Tensor) -> dict:
        logits, regression, centerness, anchors = flatten_predictions(outputs)
        b, n, t = logits.shape
        device = logits.device
        if len(targets) != b:
            raise ValueError(f"{len(targets)} targets for a batch of {b} images")
        if tuple(text_mask.shape) != (b, t):
            raise ValueError(f"text_mask has shape {tuple(text_mask.shape)}, the token logits [{b}, *, {t}]")
        if anchors.shape[0] != n:
            raise ValueError(f"{anchors.shape[0]} anchors but {n} token logits per image")
        for i, tgt in enumerate(targets):
            g, pm = tgt["boxes"].shape[0], tgt["positive_map"]
            if pm.ndim != 2 or pm.shape[0] != g or pm.shape[1] != t:
                raise ValueError(f"image {i}: positive_map has shape {tuple(pm.shape)}, expected [{g}, {t}] "
                                 "(one row per box, as wide as the token logits)")
            ignore = tgt.get("ignore_tokens")
            if ignore is not None and tuple(ignore.shape) != (t,):
                raise ValueError(f"image {i}: ignore_tokens has shape {tuple(ignore.shape)}, expected [{t}] "
                                 "(one flag per token of the logits)")
            regions = tgt.get("ignore_regions")
            if regions is not None and (regions.ndim != 2 or regions.shape[1] != 4):
                raise ValueError(f"image {i}: ignore_regions has shape {tuple(regions.shape)}, expected [K, 4]")
            if tgt.get("box_loss") is not None and torch.as_tensor(tgt["box_loss"]).numel() != 1:
                raise ValueError(f"image {i}: box_loss must be one bool, got shape {tuple(tgt['box_loss'].shape)}")

        boxes, valid = pad_boxes([tgt["boxes"].to(device) for tgt in targets])       # [B, G, 4]
        matched, ignored = self._assign_with_regions([an.to(device) for an in outputs["anchors"]], targets,
                                                     boxes, valid, device)
        maps = torch.zeros(b, boxes.shape[1], t, device=device)
        for i, tgt in enumerate(targets):
            maps[i, : tgt["positive_map"].shape[0]] = tgt["positive_map"].to(device=device, dtype=torch.float32)

        pos = matched >= 0                                                           # [B, N]
        num_pos = pos.sum().to(torch.float32)
        world = float(_world_size())
        num_pos_avg = torch.clamp(_sum_over_workers(num_pos) / world, min=1.0)

        # token loss over every (anchor, real token) pair
        tok_targets = token_targets(maps, matched, self.noobj_num_tokens)           # [B, N, T]
        focal = sigmoid_focal_loss(logits, tok_targets, self.alpha, self.gamma)
        real = (text_mask.to(device) > 0)[:, None, :].clone()                      # [B, 1, T]
        for i, tgt in enumerate(targets):
            if tgt.get("ignore_tokens") is not None:
                real[i, 0] &= ~tgt["ignore_tokens"].to(device=device, dtype=torch.bool)
        if ignored is not None:
            real = real & ~ignored[..., None]                                        # [B, N, T]
        loss_token = torch.where(real, focal, torch.zeros_like(focal)).sum() / num_pos_avg

        # box losses over the positive anchors (of the images that take them)
        # (every worker all-reduces the count, flags or not: = num_pos_avg when no image is flagged)
        takes = torch.tensor([bool(tgt.get("box_loss", True)) for tgt in targets], device=device)
        boxed = pos & takes[:, None]
        num_boxed_avg = torch.clamp(_sum_over_workers(boxed.sum().to(torch.float32)) / world, min=1.0)
        img_idx, anchor_idx = boxed.nonzero(as_tuple=True)
        pos_anchors = anchors[anchor_idx]                                            # [P, 4]
        gt = boxes[img_idx, matched[img_idx, anchor_idx]]                            # [P, 4]
        gt = self.box_coder.decode(self.box_coder.encode(gt, pos_anchors), pos_anchors)
        pred = self.box_coder.decode(regression[img_idx, anchor_idx], pos_anchors)
        ctr_targets = centerness_targets(gt, pos_anchors)                            # [P]
        ctr_sum_avg = _sum_over_workers(ctr_targets.sum()) / world
        giou_loss = 1.0 - elementwise_giou(pred, gt)
        loss_reg = (giou_loss * ctr_targets).sum() / ctr_sum_avg.clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(centerness[img_idx, anchor_idx], ctr_targets,
                                                      reduction="sum") / num_boxed_avg
        return {"loss_token": loss_token, "loss_reg": loss_reg, "loss_centerness": loss_ctr}

    def _assign_with_regions(self, anchors: list[torch.Tensor], targets: Sequence[Mapping], boxes: torch.Tensor,
                             valid: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ATSS over each image's boxes, or over its boxes then its ``ignore_regions`` -> matched
        [B, N] (box index or -1; an anchor given a region is -1) and ignored [B, N] bool (None
        when no image has a region)."""
        regions = [tgt.get("ignore_regions") for tgt in targets]
        if not any(r is not None and r.shape[0] for r in regions):
            return atss_assign(anchors, boxes, valid, self.topk), None
        both, both_valid = pad_boxes([torch.cat([tgt["boxes"].to(device), r.to(device, torch.float32)])
                                      if r is not None else tgt["boxes"].to(device)
                                      for tgt, r in zip(targets, regions)])
        index = atss_assign(anchors, both, both_valid, self.topk)
        counts = torch.tensor([tgt["boxes"].shape[0] for tgt in targets], device=device)[:, None]
        ignored = index >= counts
        return torch.where(ignored, torch.full_like(index, -1), index), ignored


def _scale_vector(scale) -> torch.Tensor:
    """A float, or (scale_x, scale_y) -> [4] multiplier for xyxy boxes."""
    if isinstance(scale, (int, float)):
        sx = sy = float(scale)
    else:
        sx, sy = (float(v) for v in scale)
    return torch.tensor([sx, sy, sx, sy], dtype=torch.float32)


def targets_from_samples(samples: Sequence[Mapping], encoding, scales=1.0,
                         device: torch.device | str | None = None) -> list[dict]:
    """Grounding records -> the criterion's targets.

    samples: per image a mapping with ``caption``, ``boxes`` ([G, 4] xyxy, absolute pixels of the
    stored image) and ``tokens_positive`` (per box a list of [begin, end) character spans of the
    caption; the grounding schema of docs/architecture.md).
    encoding: the fast tokenizer's BatchEncoding of the samples' captions, in order (e.g.
    ``GLIP.tokenize``); its width T is the width of the token logits.
    scales: the resize factor from the stored image to the network input: one float for all
    images, or a sequence with one entry per image, each a float or (scale_x, scale_y) (boxes
    are multiplied by it, official ``BoxList.resize``).

    Returns per image {"boxes": [G, 4] float32 in the network-input frame, "positive_map":
    [G, T] float32 binary, spans mapped with the official fallbacks; a box whose spans map to no
    token (e.g. truncated away) keeps an all-zero row}.
    """
    if len(encoding["input_ids"]) != len(samples):
        raise ValueError(f"the encoding holds {len(encoding['input_ids'])} captions for {len(samples)} samples")
    num_tokens = len(encoding["input_ids"][0]) if len(samples) else 0
    if isinstance(scales, (int, float)):
        scales = [scales] * len(samples)
    if len(scales) != len(samples):
        raise ValueError(f"{len(scales)} scales for {len(samples)} samples")
    targets = []
    for i, (sample, scale) in enumerate(zip(samples, scales)):
        boxes = torch.as_tensor(sample["boxes"], dtype=torch.float32).reshape(-1, 4)
        spans = sample["tokens_positive"]
        if len(spans) != boxes.shape[0]:
            raise ValueError(f"sample {i} ({sample.get('key', 'no key')}): {boxes.shape[0]} boxes but "
                             f"{len(spans)} tokens_positive entries")
        pmap = positive_map(encoding, [[tuple(s) for s in box_spans] for box_spans in spans], num_tokens,
                            batch_index=i)
        targets.append({"boxes": (boxes * _scale_vector(scale)).to(device),
                        "positive_map": pmap.to(device)})
    return targets
