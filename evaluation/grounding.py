"""Phrase-grounding Recall@K, model-free (re-exported by ``evaluation.detection``).

``phrase_grounding_recall`` (one protocol) and ``grounding_metrics`` (both)
follow MDETR's Flickr30k evaluator (``datasets/flickr_eval.py``; GLIP's copy is identical): a
phrase counts as found at K when any of its top-K predicted boxes has IoU >= 0.5 with one of its
ground-truth boxes ("any_box", MDETR's separate-GT mode), or with the union box of its
ground-truth boxes ("merged_box", Plummer et al.'s merged-GT mode). K = -1 means all predictions
(MDETR's "upper bound"). IoU is the continuous one, ``(x2 - x1) * (y2 - y1)`` without the legacy
``+1``, because both evaluators compute it that way. A phrase with no prediction is a miss; a
phrase missing from ``predictions`` is an error (MDETR raises "Missing predictions" too).

``EvaluationInputError`` (bad evaluation input) is defined here and shared with
``evaluation.detection``'s detection metrics, which import it from this module.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

__all__ = ["EvaluationInputError", "GroundingEvalConfig", "GROUNDING_PROTOCOLS", "box_iou", "merge_boxes",
           "phrase_grounding_recall", "grounding_metrics"]

GROUNDING_PROTOCOLS = ("any_box", "merged_box")


class EvaluationInputError(ValueError):
    """Bad evaluation input: the message names the argument, the entry and the fix."""


@dataclass
class GroundingEvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])   # -1: all predictions ("upper bound")
    iou_threshold: float = 0.5
    protocols: list[str] = field(default_factory=lambda: list(GROUNDING_PROTOCOLS))

    def validate(self) -> None:
        bad = [k for k in self.ks if k != -1 and k < 1]
        if bad or not self.ks:
            raise ValueError(f"ks = {self.ks}: give positive integers (or -1 for all predictions)")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold = {self.iou_threshold}: must be in (0, 1]")
        unknown = [p for p in self.protocols if p not in GROUNDING_PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"protocols = {self.protocols}: choose from {list(GROUNDING_PROTOCOLS)}")


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """``[N, 4] x [M, 4]`` xyxy -> ``[N, M]`` IoU, continuous areas (no ``+1``), as MDETR's."""
    a = np.asarray(boxes1, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes2, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def merge_boxes(boxes: np.ndarray) -> np.ndarray:
    """The smallest box enclosing all of ``boxes`` (``[1, 4]``), MDETR's merged ground truth."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.array([[b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]])


def _as_boxes(value: Any, what: str, allow_empty: bool) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is not None and arr.size == 0 and allow_empty:
        return arr.reshape(0, 4)
    if arr is None or arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] == 0 or not np.isfinite(arr).all():
        fix = "a ranked list of [x1, y1, x2, y2] boxes" if allow_empty else "at least one [x1, y1, x2, y2] box"
        raise EvaluationInputError(f"{what}: expected {fix}, got {value!r:.80}")
    return arr


def _recall_name(k: int) -> str:
    return "upper_bound" if k == -1 else f"R@{k}"


def phrase_grounding_recall(predictions: Mapping[Hashable, Sequence], ground_truth: Mapping[Hashable, Sequence],
                            *, ks: Sequence[int] = (1, 5, 10), iou_threshold: float = 0.5,
                            protocol: str = "any_box",
                            phrase_types: Mapping[Hashable, Sequence[str]] | None = None) -> dict[str, Any]:
    """Recall@K of one protocol. Keys identify a phrase (e.g. ``(image_id, phrase_index)``);
    ``predictions[key]`` is its ranked list of xyxy boxes (best first, may be empty) and
    ``ground_truth[key]`` its boxes. ``phrase_types`` (optional) adds MDETR's per-type recall.
    Predictions for keys without ground truth are ignored and counted."""
    GroundingEvalConfig(ks=list(ks), iou_threshold=iou_threshold, protocols=[protocol]).validate()
    if not ground_truth:
        raise EvaluationInputError("ground_truth: no phrases to evaluate (is the file an evaluation split "
                                   "with tokens_positive_eval?)")
    missing = [key for key in ground_truth if key not in predictions]
    if missing:
        raise EvaluationInputError(f"predictions: {len(missing)} of {len(ground_truth)} phrases have no entry, "
                                   f"e.g. {missing[:3]}; give every phrase a (possibly empty) list of boxes")
    hits = {k: defaultdict(int) for k in ks}
    totals: dict[str, int] = defaultdict(int)
    for key, gt_boxes in ground_truth.items():
        gt = _as_boxes(gt_boxes, f"ground_truth[{key!r}]", allow_empty=False)
        if protocol == "merged_box":
            gt = merge_boxes(gt)
        pred = _as_boxes(predictions[key], f"predictions[{key!r}]", allow_empty=True)
        best = box_iou(pred, gt).max(axis=1) if len(pred) else np.zeros(0)   # per ranked prediction
        groups = ["all", *(phrase_types.get(key, ()) if phrase_types else ())]
        for group in groups:
            totals[group] += 1
        for k in ks:
            top = best if k == -1 else best[:k]
            if top.size and top.max() >= iou_threshold:
                for group in groups:
                    hits[k][group] += 1
    result: dict[str, Any] = {"protocol": protocol, "iou_threshold": iou_threshold,
                              "n_phrases": len(ground_truth),
                              "n_ignored_predictions": sum(1 for key in predictions if key not in ground_truth)}
    for k in ks:
        result[_recall_name(k)] = hits[k]["all"] / totals["all"]
    if phrase_types:
        result["by_type"] = {group: {_recall_name(k): hits[k][group] / totals[group] for k in ks}
                             for group in sorted(totals) if group != "all"}
    return result


def grounding_metrics(predictions: Mapping[Hashable, Sequence], ground_truth: Mapping[Hashable, Sequence],
                      config: GroundingEvalConfig | None = None,
                      phrase_types: Mapping[Hashable, Sequence[str]] | None = None) -> dict[str, Any]:
    """Recall@K under every protocol of ``config`` (default: any_box and merged_box)."""
    config = config or GroundingEvalConfig()
    config.validate()
    return {protocol: phrase_grounding_recall(predictions, ground_truth, ks=config.ks,
                                              iou_threshold=config.iou_threshold, protocol=protocol,
                                              phrase_types=phrase_types)
            for protocol in config.protocols}
