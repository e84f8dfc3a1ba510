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
- ``unmatched``: pseudo boxes whose span is no object phrase (e.g. a scene phrase "a wall");
- ``by_score``: the same counts per score bar ``t`` (``bars``): ``above`` counts the boxes scoring
  ``> t`` (what a student reading boxes above the bar ``t`` gets: precision, and recall against
  all mentioned objects), ``bin`` those scoring in ``(t, next bar]``.

``score_bar_for_precision`` reads that curve: the lowest bar at which a group's precision reaches
a target.

``write_oracle_shards`` writes the other use of the truth: the round's pseudo-labelled shards
with the teacher's boxes replaced by the true boxes of the objects each caption mentions (the
``oracle`` of ``pipeline selftrain``: what perfect pseudo labels of the same images would add).

Boxes: pseudo labels are ``xyxy`` in the legacy convention (x2 = x + w - 1), as the truth's
``bbox`` ``[x, y, w, h]`` is converted here (the truth's ``box_convention``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from core.storage import Folder, expand_shards, join, open_input, shard_name
from evaluation.grounding import box_iou
from stages.readers.common import BoxConvention, xywh_to_xyxy
from stages.readers.output import read_output_samples
from stages.schema import Sample
from stages.write import encode_shard

__all__ = ["pseudo_label_quality", "load_truth", "score_bar_for_precision", "write_oracle_shards", "SCORE_BARS"]

# the bars of the precision-by-score curve (the teacher stores boxes from its own min_score up)
SCORE_BARS = (0.0, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def load_truth(path: str | Path) -> tuple[dict[tuple[str, str], dict], set[str]]:
    """``web_truth.json`` -> ({(shard, key): sample}, names of the rare classes)."""
    data = json.loads(Path(path).read_text())
    samples = {(s["shard"], s["key"]): s for s in data["samples"]}
    rare = {c["name"] for c in data["categories"] if c.get("frequency") == "r"}
    return samples, rare


def pseudo_label_quality(samples: Iterable[Sample], truth: dict[tuple[str, str], dict],
                         rare: set[str], iou_threshold: float = 0.5,
                         bars: tuple[float, ...] = SCORE_BARS) -> dict[str, dict]:
    """``samples``: the pseudo-labelled shards' samples (``pipeline.storage.iter_output_samples``;
    ``input_shard`` is the shard name; a web image missing from them contributes its mentioned
    objects only). Returns
    {"rare": {...}, "common": {...}, "unmatched": n, "by_score": [{"bar", "above", "bin"}, ...]}
    as described above (a box without a score counts as score 1)."""
    groups = {g: {"boxes": 0, "correct": 0, "mentioned": 0} for g in ("rare", "common")}
    for sample in truth.values():
        for obj in sample["objects"]:
            if obj.get("mentioned"):
                groups["rare" if obj["name"] in rare else "common"]["mentioned"] += 1
    unmatched = 0
    scored: list[tuple[float, str, int]] = []            # (score, group, correct)
    for pseudo in samples:
        sample = truth.get((pseudo.input_shard, pseudo.key))
        if sample is None:
            raise KeyError(f"pseudo label {pseudo.input_shard}/{pseudo.key} is not a web image of this world")
        by_span = {tuple(o["span"]): o for o in sample["objects"] if o.get("span")}
        scores = pseudo.scores or [1.0] * len(pseudo.boxes)
        for box, positive, score in zip(pseudo.boxes, pseudo.tokens_positive, scores):
            obj = by_span.get(tuple(positive[0])) if positive else None
            if obj is None:
                unmatched += 1
                continue
            name = "rare" if obj["name"] in rare else "common"
            true_box = xywh_to_xyxy(obj["bbox"], BoxConvention.LEGACY)
            correct = int(box_iou(np.array([box]), np.array([true_box]))[0, 0] >= iou_threshold)
            groups[name]["boxes"] += 1
            groups[name]["correct"] += correct
            scored.append((float(score), name, correct))
    for group in groups.values():
        _rates(group, group["mentioned"])
    by_score = []
    for i, bar in enumerate(bars):
        top = bars[i + 1] if i + 1 < len(bars) else float("inf")
        row = {"bar": bar, "above": {}, "bin": {}}
        for name in groups:
            above = [c for s, g, c in scored if g == name and s > bar]
            inside = [c for s, g, c in scored if g == name and bar < s <= top]
            row["above"][name] = _rates({"boxes": len(above), "correct": sum(above)}, groups[name]["mentioned"])
            row["bin"][name] = _rates({"boxes": len(inside), "correct": sum(inside)}, groups[name]["mentioned"])
        by_score.append(row)
    return {**groups, "unmatched": unmatched, "by_score": by_score}


def _rates(counts: dict, mentioned: int) -> dict:
    counts["precision"] = counts["correct"] / counts["boxes"] if counts["boxes"] else None
    counts["recall"] = counts["correct"] / mentioned if mentioned else None
    return counts


def score_bar_for_precision(quality: dict, target: float, group: str = "rare", floor: float = 0.0,
                            min_boxes: int = 20) -> tuple[float | None, str]:
    """The lowest bar (>= ``floor``) of ``quality["by_score"]`` at which ``group``'s precision
    above the bar reaches ``target`` with at least ``min_boxes`` boxes left. Returns
    ``(bar, why)``; ``bar`` is None when no bar reaches the target (``why`` says how close the
    best came)."""
    rows = [r for r in quality["by_score"] if r["bar"] >= floor and r["above"][group]["boxes"] >= min_boxes]
    for row in rows:
        p = row["above"][group]["precision"]
        if p is not None and p >= target:
            return row["bar"], (f"the lowest bar at which the {group} pseudo boxes above it are right "
                                f"{100 * p:.1f} % >= {100 * target:.0f} % of the time "
                                f"({row['above'][group]['boxes']} boxes)")
    best = max(rows, key=lambda r: r["above"][group]["precision"] or 0.0, default=None)
    if best is None:
        return None, f"fewer than {min_boxes} {group} boxes above every bar >= {floor:g}"
    return None, (f"no bar reaches {100 * target:.0f} % {group} precision; the best is "
                  f"{100 * (best['above'][group]['precision'] or 0):.1f} % above {best['bar']:g}")


def write_oracle_shards(pseudo_shards_dir: str | Path, truth_path: str | Path, out_dir: str | Path) -> dict:
    """Every ``*.tar`` of ``pseudo_shards_dir`` (output shards, ``stages.write`` format) rewritten
    under ``out_dir`` with the same name, samples, keys, images and phrases, each record's
    ``boxes`` / ``tokens_positive`` / ``scores`` replaced by the true boxes (``xyxy`` in the
    truth's ``box_convention``, the frame of the pseudo boxes) of the objects its caption mentions,
    each with its mention span and score 1.0, and ``labeler`` = ``{"model": "oracle", ...,
    "teacher": the replaced labeler}``. The tars alone: what a pseudo training source reads.
    Returns ``{"shards", "samples", "boxes", "teacher_boxes"}``. Raises KeyError for a sample that
    is not a web image of the truth's world, ValueError when its caption differs from the truth's."""
    data = json.loads(Path(truth_path).read_text())
    convention = BoxConvention(data["box_convention"])
    truth = {(s["shard"], s["key"]): s for s in data["samples"]}
    out = Folder(str(out_dir))
    counts = {"shards": 0, "samples": 0, "boxes": 0, "teacher_boxes": 0}
    for url in expand_shards([join(str(pseudo_shards_dir), "*.tar")], where="pseudo shards",
                             fix="pseudo-label the web shards first"):
        samples = []
        with open_input(url) as fh:
            for sample in read_output_samples(fh, name=url):
                said = truth.get((sample.input_shard, sample.key))
                if said is None:
                    raise KeyError(f"pseudo label {sample.input_shard}/{sample.key} is not a web image of the "
                                   f"world of {truth_path}")
                if said["caption"] != sample.caption:
                    raise ValueError(f"{url}: {sample.key}: caption {sample.caption!r:.60} differs from the "
                                     f"truth's {said['caption']!r:.60}: the spans of {truth_path} do not apply")
                objects = [o for o in said["objects"] if o.get("mentioned") and o.get("span")]
                counts["teacher_boxes"] += len(sample.boxes)
                samples.append(dataclasses.replace(
                    sample, boxes=[xywh_to_xyxy(o["bbox"], convention) for o in objects],
                    tokens_positive=[[list(o["span"])] for o in objects], scores=[1.0] * len(objects),
                    labeler={"model": "oracle", "truth": Path(truth_path).name,
                             "box_convention": convention.value, "teacher": sample.labeler}))
                counts["samples"] += 1
                counts["boxes"] += len(objects)
        out.write_bytes(f"{shard_name(url)}.tar", encode_shard(samples))
        counts["shards"] += 1
    return counts
