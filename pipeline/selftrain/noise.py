"""How much of a difference between two models is the evaluation set's luck? A paired bootstrap
over the held-out images.

Each resample draws the held-out images with replacement (the same draw for every model: the
differences are paired) and re-scores every model's saved predictions (``NAME_detection_
predictions.json``) on it with the same pycocotools protocol as the evaluation. A repeated image
gets a new id, its annotations and detections copied under it. The standard deviation of
``a - b`` over the resamples is the noise to read a measured ``a - b`` against.

``training_spread`` is the other noise: the same training with another data-order seed.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

__all__ = ["paired_bootstrap", "training_spread"]

METRICS = ("AP", "APr", "APc", "APf")


def _resample(gt: dict, preds: dict[str, list[dict]], draw: list[int]) -> tuple[dict, dict[str, list[dict]]]:
    images = {im["id"]: im for im in gt["images"]}
    anns: dict = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    by_model = {m: {} for m in preds}
    for m, dets in preds.items():
        for d in dets:
            by_model[m].setdefault(d["image_id"], []).append(d)
    new_images, new_anns, new_preds = [], [], {m: [] for m in preds}
    for new_id, old_id in enumerate(draw, start=1):
        new_images.append(dict(images[old_id], id=new_id))
        for a in anns.get(old_id, []):
            new_anns.append(dict(a, id=len(new_anns) + 1, image_id=new_id))
        for m in preds:
            new_preds[m] += [dict(d, image_id=new_id) for d in by_model[m].get(old_id, [])]
    return dict(gt, images=new_images, annotations=new_anns), new_preds


def paired_bootstrap(gt_file: str | Path, predictions: dict[str, str | Path],
                     pairs: list[tuple[str, str]], resamples: int = 50, seed: int = 0) -> dict:
    """``predictions``: {model: its detection predictions JSON}; ``pairs``: (a, b) differences to
    measure. Returns {"resamples": n, "images": n, "pairs": {"a - b": {metric: {"sd", "mean",
    "p_positive"}}}} with values as fractions (AP units; x100 for the report)."""
    from evaluation.detection import DetectionEvalConfig, coco_detection_metrics

    gt = json.loads(Path(gt_file).read_text())
    preds = {m: json.loads(Path(p).read_text()) for m, p in predictions.items()}
    ids = [im["id"] for im in gt["images"]]
    rng = random.Random(f"bootstrap-{seed}")
    samples: dict[str, dict[str, list[float]]] = {f"{a} - {b}": {k: [] for k in METRICS} for a, b in pairs}
    for _ in range(resamples):
        draw = [rng.choice(ids) for _ in ids]
        sub_gt, sub_preds = _resample(gt, preds, draw)
        scores = {m: coco_detection_metrics(sub_gt, sub_preds[m], DetectionEvalConfig()) for m in preds}
        for a, b in pairs:
            for k in METRICS:
                va, vb = scores[a].get(k), scores[b].get(k)
                if va is not None and vb is not None:
                    samples[f"{a} - {b}"][k].append(va - vb)
    out = {}
    for pair, by_metric in samples.items():
        out[pair] = {k: ({"sd": float(np.std(v, ddof=1)), "mean": float(np.mean(v)),
                          "p_positive": float(np.mean(np.array(v) > 0))} if len(v) > 1 else None)
                     for k, v in by_metric.items()}
    return {"resamples": resamples, "images": len(ids), "pairs": out}


def training_spread(metrics: dict[str, dict], seeds: dict[str, int]) -> dict:
    """The spread of single trainings that differ only in their data-order seed.

    ``metrics``: name -> that control's evaluation ({"detection": {"AP", "APr", "APf", ...}});
    ``seeds``: name -> its data-order seed. Returns {"seeds": {...}, "AP": {"values": [...],
    "sd": sample standard deviation or None}, "APr": ..., "APf": ...} (values None where the
    evaluation has none; sd None with fewer than two values)."""
    import statistics

    out: dict = {"seeds": dict(seeds)}
    for key in ("AP", "APr", "APf"):
        values = [m["detection"].get(key) for m in metrics.values()]
        known = [v for v in values if v is not None]
        out[key] = {"values": values, "sd": statistics.stdev(known) if len(known) > 1 else None}
    return out
