"""Evaluation metrics, model-free: box AP (COCO and LVIS-style), phrase-grounding Recall@K, and
the results files.

Detection: ``coco_detection_metrics(gt, detections, config)``. ``gt`` is a COCO-format file
(path or fsspec URL) or its dict; ``detections`` are ``{"image_id", "category_id", "bbox"
(xywh), "score"}``. pycocotools' ``COCOeval`` does the matching; the numbers are read from its
accumulated precision/recall arrays at ``config.max_dets`` (pycocotools' own ``summarize()``
reads AP at a fixed 100 detections and prints to stdout; we avoid both). Values are fractions
in [0, 1]; ``None`` where a metric is undefined (e.g. APs when no ground-truth box is small).
An empty detection list gives AP 0 for every category with ground truth.

LVIS: the official ``lvis`` package (0.5.3) uses ``np.float``, removed in NumPy 2, so it is not
a dependency and is never called (``lvis_available()`` tells whether it would even import and
run). Instead, when the categories carry LVIS ``frequency`` letters, APr/APc/APf are computed
here from COCOeval's per-category precision, exactly as LVIS's ``_summarize`` averages them;
and when the ground-truth images carry ``neg_category_ids`` / ``not_exhaustive_category_ids``
(``federated``), the LVIS federated protocol is reproduced on COCOeval: the top ``max_dets``
(300 for LVIS) detections per image over all categories; detections of a category neither
annotated nor listed negative for the image are discarded; unmatched detections of a category
listed not-exhaustive for the image are ignored. Otherwise the metrics are plain COCO (maxDets
per image and category, as pycocotools counts them). The result's ``notes`` say which was done.

Phrase-grounding Recall@K (MDETR's Flickr30k protocols) lives in ``evaluation.grounding`` and is
re-exported here.

Results: ``write_results(out_dir, name, metrics, predictions)`` writes ``NAME_metrics.json`` and
``NAME_predictions.json`` side by side (each atomically); ``format_metrics_table(metrics)``
renders any of the metric dicts as a plain-text table (fractions shown as percentages).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from core.storage import Folder
from evaluation.grounding import (GROUNDING_PROTOCOLS, EvaluationInputError, GroundingEvalConfig, box_iou, grounding_metrics, merge_boxes, phrase_grounding_recall)  # noqa: F401 - re-exported
from stages.readers.common import load_json

__all__ = ["EvaluationInputError", "DetectionEvalConfig", "GroundingEvalConfig", "lvis_available",
           "coco_detection_metrics", "box_iou", "merge_boxes", "phrase_grounding_recall",
           "grounding_metrics", "write_results", "format_metrics_table"]


@dataclass
class DetectionEvalConfig:
    max_dets: int = 100                    # detections per image; 300 for LVIS (its official value)
    per_category: bool = False             # add per-category AP to the result
    federated: bool | None = None          # LVIS federated protocol; None: when the GT images carry it

    def validate(self) -> None:
        if self.max_dets < 1:
            raise ValueError(f"max_dets = {self.max_dets}: must be at least 1 (100 for COCO, 300 for LVIS)")


def lvis_available() -> bool:
    """Whether the official ``lvis`` package imports and its evaluator could run here.

    lvis 0.5.3 calls ``np.float``, which NumPy >= 1.24 removed, so under NumPy 2 this is False
    even when the package is installed."""
    try:
        import lvis  # noqa: F401
    except Exception:
        return False
    return hasattr(np, "float")


# ---------------------------------------------------------------------------------------------
# detection

def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_box(box: Any) -> bool:
    return (isinstance(box, (list, tuple)) and len(box) == 4 and all(_finite(v) for v in box)
            and box[2] >= 0 and box[3] >= 0)


def _ground_truth(gt: str | Path | Mapping) -> tuple[dict, str]:
    """Load and check the ground truth; return a normalised copy for pycocotools."""
    if isinstance(gt, (str, Path)):
        name, data = str(gt), load_json(gt)
    else:
        name, data = "ground truth", gt
    if not isinstance(data, Mapping) or "images" not in data or "categories" not in data:
        raise EvaluationInputError(f"{name}: expected a COCO-format object with 'images', 'categories' "
                                   "and 'annotations'")
    images = list(data["images"])
    categories = list(data["categories"])
    for key, entries in (("images", images), ("categories", categories)):
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or "id" not in entry:
                raise EvaluationInputError(f"{name}: {key}[{i}]: expected an object with an 'id', "
                                           f"got {entry!r:.60}")
    image_ids = {img.get("id") for img in images}
    cat_ids = {cat.get("id") for cat in categories}
    anns = []
    for k, ann in enumerate(data.get("annotations") or []):
        if ann.get("image_id") not in image_ids:
            raise EvaluationInputError(f"{name}: annotations[{k}].image_id: annotation {k} refers to "
                                       f"image_id {ann.get('image_id')!r} that is not in images")
        if ann.get("category_id") not in cat_ids:
            raise EvaluationInputError(f"{name}: annotations[{k}].category_id: unknown category id "
                                       f"{ann.get('category_id')!r}")
        if not _check_box(ann.get("bbox")):
            raise EvaluationInputError(f"{name}: annotations[{k}].bbox: expected 4 numbers [x, y, w, h] "
                                       f"with w, h >= 0, got {ann.get('bbox')!r}")
        x, y, w, h = ann["bbox"]
        # pycocotools treats annotation id 0 as "unmatched" and needs iscrowd and area: renumber
        # from 1 and fill the defaults (LVIS has no iscrowd).
        anns.append({**ann, "id": k + 1, "iscrowd": int(ann.get("iscrowd", 0) or 0),
                     "area": float(ann.get("area", w * h))})
    return {"images": images, "categories": categories, "annotations": anns}, name


def _check_detections(detections: Iterable[Mapping], image_ids: set, cat_ids: set) -> list[dict]:
    out = []
    for i, det in enumerate(detections):
        if not isinstance(det, Mapping):
            raise EvaluationInputError(f"detections[{i}]: expected an object, got {det!r:.60}")
        if det.get("image_id") not in image_ids:
            raise EvaluationInputError(f"detections[{i}].image_id: {det.get('image_id')!r} is not an image "
                                       "of the ground truth; evaluate on the same split you predicted")
        if det.get("category_id") not in cat_ids:
            raise EvaluationInputError(f"detections[{i}].category_id: {det.get('category_id')!r} is not a "
                                       "category of the ground truth; map labels back to its ids")
        if not _check_box(det.get("bbox")):
            raise EvaluationInputError(f"detections[{i}].bbox: expected 4 numbers [x, y, w, h] with "
                                       f"w, h >= 0, got {det.get('bbox')!r}")
        if not _finite(det.get("score")):
            raise EvaluationInputError(f"detections[{i}].score: expected a finite number, "
                                       f"got {det.get('score')!r}")
        x, y, w, h = (float(v) for v in det["bbox"])
        out.append({"image_id": det["image_id"], "category_id": det["category_id"], "bbox": [x, y, w, h],
                    "score": float(det["score"]), "area": w * h, "iscrowd": 0})
    return out


def _federated_filter(dets: list[dict], gt: dict, max_dets: int, name: str) -> tuple[list[dict], dict]:
    """LVIS: top ``max_dets`` per image, then drop categories with no information for the image."""
    neg, not_exhaustive = {}, {}
    for i, img in enumerate(gt["images"]):
        for key, store in (("neg_category_ids", neg), ("not_exhaustive_category_ids", not_exhaustive)):
            if key not in img:
                raise EvaluationInputError(f"{name}: images[{i}].{key}: missing; the federated (LVIS) "
                                           "protocol needs it on every image (or set federated=false)")
            store[img["id"]] = set(img[key])
    positive = defaultdict(set)
    for ann in gt["annotations"]:
        positive[ann["image_id"]].add(ann["category_id"])
    per_image = defaultdict(list)
    for det in dets:
        per_image[det["image_id"]].append(det)
    kept = []
    for image_id, image_dets in per_image.items():
        image_dets = sorted(image_dets, key=lambda d: d["score"], reverse=True)[:max_dets]
        kept += [d for d in image_dets
                 if d["category_id"] in positive[image_id] or d["category_id"] in neg[image_id]]
    return kept, not_exhaustive


def _cocoeval_class():
    from pycocotools.cocoeval import COCOeval

    class FederatedCOCOeval(COCOeval):
        """COCOeval that ignores unmatched detections of not-exhaustively annotated categories."""

        not_exhaustive: dict = {}

        def evaluateImg(self, imgId, catId, aRng, maxDet):
            result = super().evaluateImg(imgId, catId, aRng, maxDet)
            if result is not None and catId in self.not_exhaustive.get(imgId, ()):
                result["dtIgnore"] = np.logical_or(result["dtIgnore"], result["dtMatches"] == 0)
            return result

    return FederatedCOCOeval


def _mean(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def coco_detection_metrics(gt: str | Path | Mapping, detections: Iterable[Mapping],
                           config: DetectionEvalConfig | None = None) -> dict[str, Any]:
    """Box AP of ``detections`` against the COCO-format ground truth ``gt`` (see the module doc)."""
    from pycocotools.coco import COCO

    config = config or DetectionEvalConfig()
    config.validate()
    gt_data, name = _ground_truth(gt)
    image_ids = {img["id"] for img in gt_data["images"]}
    cat_ids = {cat["id"] for cat in gt_data["categories"]}
    dets = _check_detections(detections, image_ids, cat_ids)
    n_detections = len(dets)
    federated = config.federated
    if federated is None:
        federated = any("neg_category_ids" in img for img in gt_data["images"])
    not_exhaustive: dict = {}
    if federated:
        dets, not_exhaustive = _federated_filter(dets, gt_data, config.max_dets, name)
    for i, det in enumerate(dets):
        det["id"] = i + 1

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
        coco_dt.dataset = {"images": gt_data["images"], "categories": gt_data["categories"],
                           "annotations": dets}
        coco_dt.createIndex()
        evaluator = _cocoeval_class()(coco_gt, coco_dt, "bbox")
        evaluator.not_exhaustive = not_exhaustive
        evaluator.params.maxDets = [config.max_dets] if federated else sorted({1, 10, config.max_dets})
        evaluator.evaluate()
        evaluator.accumulate()
    params = evaluator.params
    precision = evaluator.eval["precision"]        # [T, R, K, A, M]
    recall = evaluator.eval["recall"]              # [T, K, A, M]
    m = params.maxDets.index(config.max_dets)
    t50 = int(np.argmin(np.abs(params.iouThrs - 0.5)))
    t75 = int(np.argmin(np.abs(params.iouThrs - 0.75)))
    metrics: dict[str, Any] = {
        "AP": _mean(precision[:, :, :, 0, m]),
        "AP50": _mean(precision[t50, :, :, 0, m]),
        "AP75": _mean(precision[t75, :, :, 0, m]),
        "APs": _mean(precision[:, :, :, 1, m]),
        "APm": _mean(precision[:, :, :, 2, m]),
        "APl": _mean(precision[:, :, :, 3, m]),
    }
    for j, max_det in enumerate(params.maxDets):
        metrics[f"AR@{max_det}"] = _mean(recall[:, :, 0, j])
    notes = []
    cats = {cat["id"]: cat for cat in gt_data["categories"]}
    if any("frequency" in cat for cat in cats.values()):
        for letter in ("r", "c", "f"):
            idx = [k for k, cid in enumerate(params.catIds) if cats[cid].get("frequency") == letter]
            metrics[f"AP{letter}"] = _mean(precision[:, :, idx, 0, m]) if idx else None
        notes.append("APr/APc/APf computed here from COCOeval per-category precision with the LVIS "
                     "frequency field (the official lvis package is "
                     + ("importable but not used)" if lvis_available() else "not usable under NumPy 2)"))
    if federated:
        notes.append(f"LVIS federated protocol reproduced on COCOeval: top {config.max_dets} detections "
                     "per image, unverified categories discarded, unmatched detections of not-exhaustive "
                     "categories ignored")
    else:
        notes.append(f"COCO protocol (pycocotools): up to {config.max_dets} detections per image and category")
    if not dets:
        notes.append("no detections: AP is 0 for every category with ground truth")
    metrics.update({"protocol": "lvis_federated" if federated else "coco", "max_dets": config.max_dets,
                    "n_images": len(image_ids), "n_detections": n_detections,
                    "n_detections_evaluated": len(dets), "notes": notes})
    if config.per_category:
        metrics["per_category"] = [
            {"category_id": cid, "name": cats[cid].get("name", str(cid)),
             "AP": _mean(precision[:, :, k, 0, m]), "AP50": _mean(precision[t50, :, k, 0, m])}
            for k, cid in enumerate(params.catIds)]
    return metrics


# ---------------------------------------------------------------------------------------------
# results files and tables

def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): _jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_results(out_dir: str | Path, name: str, metrics: Mapping, predictions: Any,
                  storage_options: dict | None = None) -> tuple[str, str]:
    """Write ``NAME_metrics.json`` and ``NAME_predictions.json`` into ``out_dir`` (a folder or an
    fsspec URL; created if needed). Each file appears complete or not at all (written under a
    temporary name, then moved). Tuple keys become strings, NumPy values plain numbers. Returns
    ``(metrics_path, predictions_path)`` (URLs for remote folders)."""
    if not name or "/" in name or "\\" in name:
        raise EvaluationInputError(f"name {name!r}: give a plain file-name prefix such as 'coco_val2017'")
    folder = Folder(str(out_dir), storage_options)
    paths = []
    for suffix, payload in (("predictions", json.dumps(_jsonable(predictions))),
                            ("metrics", json.dumps(_jsonable(metrics), indent=2) + "\n")):
        file_name = f"{name}_{suffix}.json"
        folder.write_bytes(file_name, payload.encode("utf-8"))
        paths.append(folder.path(file_name) if folder.local else str(out_dir).rstrip("/") + f"/{file_name}")
    return paths[1], paths[0]


_PERCENT_KEYS = ("AP", "AR", "R@", "upper_bound")


def _cell(value: Any, key: str = "AP") -> str:
    """Metric fractions (keys AP*, AR*, R@*, upper_bound) as percentages; the rest as they are."""
    if value is None:
        return "-"
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{100 * value:.1f}" if str(key).startswith(_PERCENT_KEYS) else f"{value:g}"
    return str(value)


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])


def format_metrics_table(metrics: Mapping[str, Any], title: str = "") -> str:
    """A readable plain-text table of a metrics dict: scalars as ``metric | value`` (fractions as
    percentages with one decimal, ``-`` where undefined), nested protocol dicts (grounding) as
    one row each, ``per_category`` as its own table, ``notes`` as lines below."""
    parts = [title] if title else []
    scalars = [[k, _cell(v, k)] for k, v in metrics.items()
               if not isinstance(v, (dict, list, tuple)) and k != "by_type"]
    if scalars:
        parts.append(_grid(["metric", "value"], scalars))
    nested = {k: v for k, v in metrics.items() if isinstance(v, dict) and k != "by_type"}
    if nested:
        cols = [c for c in dict.fromkeys(c for v in nested.values() for c, x in v.items()
                                         if isinstance(x, (int, float)) and not isinstance(x, bool))]
        parts.append(_grid(["", *cols], [[k, *(_cell(v.get(c), c) for c in cols)] for k, v in nested.items()]))
        for k, v in nested.items():
            if isinstance(v.get("by_type"), dict):
                parts.append(format_metrics_table(v["by_type"], title=f"{k} by phrase type"))
    if isinstance(metrics.get("by_type"), dict):
        parts.append(format_metrics_table(metrics["by_type"], title="by phrase type"))
    rows = metrics.get("per_category")
    if isinstance(rows, list) and rows:
        cols = [c for c in rows[0] if c != "category_id"]
        parts.append(_grid(cols, [[_cell(r.get(c), c) for c in cols] for r in rows]))
    notes = metrics.get("notes") or []
    if notes:
        parts.append("\n".join(f"note: {note}" for note in notes))
    return "\n\n".join(parts)
