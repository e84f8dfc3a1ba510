"""How good are the teacher's pseudo labels? Scored against the miniature world's truth.

The world writes ``web_truth.json`` (``synth.world``): every web image's objects with their
true boxes and, for those the caption mentions, the character span of the phrase. The pipeline
never reads it; this module does, for the self-training report only. A pseudo box is **correct**
when the caption phrase it grounds (its ``tokens_positive`` span) names an object whose true box
it overlaps with IoU >= ``iou_threshold``. Per group (rare / common classes):

- ``boxes``: pseudo boxes whose phrase names an object of the group;
- ``correct``: of those, how many are correct; ``precision`` = correct / boxes;
- ``mentioned``: objects of the group the captions mention; ``recall`` = correct / mentioned
  (with one box per phrase, each mentioned object can be found at most once);
- ``unmatched``: pseudo boxes whose span is no object phrase (e.g. a scene phrase "a wall").

Boxes: pseudo labels are ``xyxy`` in the legacy convention (x2 = x + w - 1), as the truth's
``bbox`` ``[x, y, w, h]`` is converted here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from evaluation.grounding import box_iou
from stages.readers.common import BoxConvention, xywh_to_xyxy
from stages.schema import Sample

__all__ = ["pseudo_label_quality", "load_truth"]


def load_truth(path: str | Path) -> tuple[dict[tuple[str, str], dict], set[str]]:
    """``web_truth.json`` -> ({(shard, key): sample}, names of the rare classes)."""
    data = json.loads(Path(path).read_text())
    samples = {(s["shard"], s["key"]): s for s in data["samples"]}
    rare = {c["name"] for c in data["categories"] if c.get("frequency") == "r"}
    return samples, rare


def pseudo_label_quality(samples: Iterable[Sample], truth: dict[tuple[str, str], dict],
                         rare: set[str], iou_threshold: float = 0.5) -> dict[str, dict]:
    """``samples``: the pseudo-labelled shards' samples (``pipeline.storage.iter_output_samples``;
    ``input_shard`` is the shard name; a web image missing from them contributes its mentioned
    objects only). Returns
    {"rare": {...}, "common": {...}, "unmatched": n} as described above."""
    groups = {g: {"boxes": 0, "correct": 0, "mentioned": 0} for g in ("rare", "common")}
    for sample in truth.values():
        for obj in sample["objects"]:
            if obj.get("mentioned"):
                groups["rare" if obj["name"] in rare else "common"]["mentioned"] += 1
    unmatched = 0
    for pseudo in samples:
        sample = truth.get((pseudo.input_shard, pseudo.key))
        if sample is None:
            raise KeyError(f"pseudo label {pseudo.input_shard}/{pseudo.key} is not a web image of this world")
        by_span = {tuple(o["span"]): o for o in sample["objects"] if o.get("span")}
        for box, positive in zip(pseudo.boxes, pseudo.tokens_positive):
            obj = by_span.get(tuple(positive[0])) if positive else None
            if obj is None:
                unmatched += 1
                continue
            group = groups["rare" if obj["name"] in rare else "common"]
            group["boxes"] += 1
            true_box = xywh_to_xyxy(obj["bbox"], BoxConvention.LEGACY)
            group["correct"] += int(box_iou(np.array([box]), np.array([true_box]))[0, 0] >= iou_threshold)
    for group in groups.values():
        group["precision"] = group["correct"] / group["boxes"] if group["boxes"] else None
        group["recall"] = group["correct"] / group["mentioned"] if group["mentioned"] else None
    return {**groups, "unmatched": unmatched}
