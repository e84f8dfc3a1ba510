"""Detections from the head's outputs (docs/model.md §8; official ``ATSSPostProcessor`` + ``boxlist_ml_nms``).

Per level and image: token probabilities = sigmoid(logits); an entity's score = the mean of its
tokens' probabilities; candidates = score > ``score_threshold`` (tested BEFORE centerness); keep
the top ``pre_nms_top_n`` candidates by score·sigmoid(centerness); final score =
sqrt(score·sigmoid(centerness)); boxes decoded from the anchors and clipped to the image (before
padding). Then over all levels: class-wise NMS with the legacy (+1) IoU, and the
``detections_per_image`` best (ties at the cut are kept, as the official ``kthvalue`` cut does).
"""
from __future__ import annotations

import torch
from torchvision.ops import nms

from model.box_ops import TO_REMOVE, BoxCoder, clip_boxes
from model.config import InferenceConfig


def entity_scores(probs: torch.Tensor, pmaps: torch.Tensor) -> torch.Tensor:
    """Mean token probability per entity.

    probs: [B, N, T] token probabilities; pmaps: [B, C, T] binary positive maps (zero rows for
    padding entities). Returns [B, N, C]; an entity without tokens scores 0.
    """
    binary = (pmaps > 0).to(probs.dtype)
    counts = binary.sum(-1).clamp(min=1)                                   # [B, C]
    return torch.bmm(probs, binary.transpose(1, 2)) / counts[:, None, :]


def classwise_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                  iou_threshold: float) -> torch.Tensor:
    """NMS within each label with the legacy (+1) IoU (official ``ml_nms``).

    boxes [K, 4], scores [K], labels [K] -> kept indices, sorted by decreasing score. torchvision's
    IoU on (x1, y1, x2 + 1, y2 + 1) is the legacy IoU; one call per label keeps it exact.
    """
    shifted = boxes + boxes.new_tensor([0, 0, TO_REMOVE, TO_REMOVE])
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for label in labels.unique():
        idx = (labels == label).nonzero().squeeze(1)
        keep[idx[nms(shifted[idx], scores[idx], iou_threshold)]] = True
    keep = keep.nonzero().squeeze(1)
    return keep[scores[keep].argsort(descending=True, stable=True)]


def _stack_maps(positive_maps, batch: int, num_tokens: int, device) -> torch.Tensor:
    """A [C, T] map (shared), or a list of B maps [C_i, T] -> [B, max C_i, T] zero-padded."""
    if isinstance(positive_maps, torch.Tensor):
        maps = [positive_maps] * batch
    else:
        maps = list(positive_maps)
    if len(maps) != batch:
        raise ValueError(f"{len(maps)} positive maps for a batch of {batch}")
    out = torch.zeros(batch, max(m.shape[0] for m in maps), num_tokens, device=device)
    for b, m in enumerate(maps):
        if m.shape[-1] != num_tokens:
            raise ValueError(f"positive map {b} has {m.shape[-1]} tokens, the logits {num_tokens}")
        out[b, :m.shape[0]] = m.to(device=device, dtype=out.dtype)
    return out


def _empty(device) -> dict:
    return {"boxes": torch.zeros(0, 4, device=device), "scores": torch.zeros(0, device=device),
            "labels": torch.zeros(0, dtype=torch.long, device=device)}


class PostProcessor:
    def __init__(self, cfg: InferenceConfig, box_coder: BoxCoder | None = None):
        self.score_threshold = cfg.score_threshold
        self.pre_nms_top_n = cfg.pre_nms_top_n
        self.nms_threshold = cfg.nms_threshold
        self.detections_per_image = cfg.detections_per_image
        self.box_coder = box_coder or BoxCoder()

    def _select_level(self, logits, regression, centerness, anchors, pmaps, image_sizes):
        """One level, all images: logits [B, N, T], regression [B, 4A, H, W], centerness
        [B, A, H, W], anchors [N, 4]. Returns per image (boxes [K, 4], scores [K], labels [K])."""
        b = logits.shape[0]
        scores = entity_scores(logits.float().sigmoid(), pmaps)                 # [B, N, C]
        regression = regression.float().permute(0, 2, 3, 1).reshape(b, -1, 4)  # (y, x, a) order
        ctr = centerness.float().permute(0, 2, 3, 1).reshape(b, -1).sigmoid()   # [B, N]
        candidates = scores > self.score_threshold
        combined = scores * ctr[:, :, None]
        out = []
        for i in range(b):
            cand = candidates[i]
            num = min(int(cand.sum()), self.pre_nms_top_n)
            values, top = combined[i][cand].topk(num, sorted=False)
            loc_cls = cand.nonzero()[top]
            loc, cls = loc_cls[:, 0], loc_cls[:, 1]
            boxes = self.box_coder.decode(regression[i, loc], anchors[loc].float())
            out.append((clip_boxes(boxes, image_sizes[i]), torch.sqrt(values), cls))
        return out

    def _select_image(self, boxes, scores, labels) -> dict:
        if boxes.numel() == 0:
            return _empty(boxes.device)
        keep = classwise_nms(boxes, scores, labels, self.nms_threshold)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        n, k = scores.numel(), self.detections_per_image
        if n > k > 0:
            thresh = torch.kthvalue(scores.float().cpu(), n - k + 1).values.item()
            keep = scores >= thresh
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return {"boxes": boxes, "scores": scores, "labels": labels}

    def __call__(self, outputs: dict, positive_maps, image_sizes=None) -> list[dict]:
        """outputs: the network's dict (``token_logits``, ``box_regression``, ``centerness``,
        ``anchors``, and ``image_sizes`` unless given). positive_maps: [C, T] for all images or a
        list of [C_i, T], rows = entities (binary or normalised; non-zero = token belongs).
        image_sizes: list of (h, w) before padding.

        Returns per image {"boxes": [K, 4] xyxy in the network input frame, "scores": [K],
        "labels": [K] entity index (0-based, row of the positive map)}, sorted by score.
        """
        logits = outputs["token_logits"]
        image_sizes = outputs["image_sizes"] if image_sizes is None else image_sizes
        b, _, t = logits[0].shape
        device = logits[0].device
        pmaps = _stack_maps(positive_maps, b, t, device)
        per_level = [self._select_level(lg, rg, ct, an, pmaps, image_sizes)
                     for lg, rg, ct, an in zip(logits, outputs["box_regression"],
                                               outputs["centerness"], outputs["anchors"])]
        results = []
        for i in range(b):
            parts = [level[i] for level in per_level]
            results.append(self._select_image(torch.cat([p[0] for p in parts]),
                                              torch.cat([p[1] for p in parts]),
                                              torch.cat([p[2] for p in parts])))
        return results
