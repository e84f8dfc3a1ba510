"""``pipeline eval CONFIG``: zero-shot detection AP (COCO-format ground truth) and phrase-grounding
Recall@K (MDETR-format ground truth) of any checkpoint, ours or official.

Detection: prompts are built from the category names, chunked when they exceed the text limit
(``inference.chunk_size`` names per prompt, as the official LVIS evaluation); detections of all
chunks are concatenated. Grounding: each evaluation phrase's spans are the entities of its
caption. Metrics JSON and predictions JSON are written next to each other.

``run_eval`` checks its inputs first (``pipeline.preflight.check_eval``): a grounding file without
``tokens_positive_eval`` (a GoldG-style training file) is refused before the model loads rather
than scored on its training spans, whose phrases are not the evaluation protocol's.
"""
from __future__ import annotations

import enum
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from core.device import Device, resolve_device
from model.config import CheckpointFormat
from core.config import load


class EvalKind(str, enum.Enum):
    DETECTION = "detection"
    GROUNDING = "grounding"


@dataclass
class EvalConfig:
    kind: EvalKind = EvalKind.DETECTION
    checkpoint: str = ""
    checkpoint_format: CheckpointFormat = CheckpointFormat.AUTO
    model: str = "glip_t"                        # config of an official checkpoint
    model_overrides: list[str] = field(default_factory=list)
    annotations: str = ""                        # COCO JSON (detection) or MDETR JSON (grounding)
    image_root: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    output: str = ""                             # folder for NAME_metrics.json / NAME_predictions.json
    name: str = "eval"
    batch_size: int = 4
    device: Device = Device.AUTO          # auto = CUDA when present, else CPU
    max_dets: int = 100                          # per image (300 for LVIS-style evaluation)
    max_images: int | None = None                # evaluate the first N images only (smoke runs)
    progress: bool = True

    def validate(self) -> None:
        for key in ("checkpoint", "annotations", "image_root", "output"):
            if not getattr(self, key):
                raise ValueError(f"{key} is empty (e.g. {key}=...)")


def load_eval_config(path: str | None, overrides: list[str] | None = None) -> EvalConfig:
    """YAML file (optional) + ``key=value`` overrides -> a validated EvalConfig."""
    return load(EvalConfig, path, overrides)


def _predictor(cfg: EvalConfig):
    from model.load import load_glip
    from model.predictor import Predictor

    model, sha = load_glip(cfg.checkpoint, cfg.checkpoint_format, cfg.model, cfg.model_overrides)
    return Predictor(model, device=resolve_device(cfg.device), batch_size=cfg.batch_size), sha


def _progress(total: int, cfg: EvalConfig, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not cfg.progress, file=sys.stderr)


def evaluate_detection(cfg: EvalConfig, predictor) -> tuple[dict, list[dict]]:
    from evaluation.detection import DetectionEvalConfig, coco_detection_metrics
    from stages.readers.coco import CocoDetectionReader, CocoReaderConfig
    from stages.readers.common import BoxConvention, load_json, xyxy_to_xywh

    reader = CocoDetectionReader(CocoReaderConfig(annotations=cfg.annotations, image_root=cfg.image_root,
                                                  storage_options=cfg.storage_options))
    cat_ids = list(reader.categories)
    names = [reader.categories[c] for c in cat_ids]
    images = list(reader)[: cfg.max_images] if cfg.max_images else list(reader)
    detections: list[dict] = []
    bar = _progress(len(images), cfg, "eval detection")
    for start in range(0, len(images), cfg.batch_size):
        chunk = images[start:start + cfg.batch_size]
        results = predictor.detect([reader.read_image(im) for im in chunk], names)
        for im, det in zip(chunk, results):
            order = det.scores.argsort(descending=True)[: cfg.max_dets]
            for i in order.tolist():
                detections.append({"image_id": im.image_id, "category_id": cat_ids[int(det.labels[i])],
                                   "bbox": [round(v, 2) for v in xyxy_to_xywh(det.boxes[i].tolist(), BoxConvention.LEGACY)],
                                   "score": round(float(det.scores[i]), 5)})
        bar.update(len(chunk))
    bar.close()
    gt = load_json(cfg.annotations, cfg.storage_options)
    if cfg.max_images:
        keep = {im.image_id for im in images}
        gt = dict(gt, images=[i for i in gt["images"] if i["id"] in keep],
                  annotations=[a for a in gt.get("annotations", []) if a["image_id"] in keep])
    metrics = coco_detection_metrics(gt, detections, DetectionEvalConfig(max_dets=cfg.max_dets))
    return metrics, detections


def evaluate_grounding(cfg: EvalConfig, predictor) -> tuple[dict, list[dict]]:
    from evaluation.detection import GroundingEvalConfig, grounding_metrics
    from stages.readers.mdetr import MdetrGroundingReader, MdetrReaderConfig

    reader = MdetrGroundingReader(MdetrReaderConfig(annotations=cfg.annotations, image_root=cfg.image_root,
                                                    storage_options=cfg.storage_options))
    targets = reader.grounding_targets()
    by_image: dict[Any, list] = {}
    for t in targets:
        by_image.setdefault(t.image_id, []).append(t)
    index = {im.image_id: im for im in reader}
    image_ids = list(by_image)[: cfg.max_images] if cfg.max_images else list(by_image)
    predictions: dict[Any, list] = {}
    bar = _progress(len(image_ids), cfg, "eval grounding")
    for start in range(0, len(image_ids), cfg.batch_size):
        ids = image_ids[start:start + cfg.batch_size]
        ims = [index[i] for i in ids]
        results = predictor.ground([reader.read_image(im) for im in ims], [im.caption for im in ims],
                                   [[t.spans for t in by_image[i]] for i in ids])
        for image_id, det in zip(ids, results):
            for j, t in enumerate(by_image[image_id]):
                mine = (det.labels == j).nonzero().flatten()
                predictions[t.key] = det.boxes[mine].tolist()
        bar.update(len(ids))
    bar.close()
    gt = {t.key: t.boxes for t in targets if t.image_id in set(image_ids)}
    metrics = grounding_metrics(predictions, gt, GroundingEvalConfig())
    rows = [{"image_id": k[0], "phrase": k[1], "boxes": v} for k, v in predictions.items()]
    return metrics, rows


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate; returns the metrics (also written to ``cfg.output``)."""
    from evaluation.detection import write_results

    from pipeline.preflight import check_eval

    check_eval(cfg)                  # checkpoint, ground truth and images, before the model loads
    t0 = time.time()
    predictor, sha = _predictor(cfg)
    if cfg.kind is EvalKind.DETECTION:
        metrics, predictions = evaluate_detection(cfg, predictor)
    else:
        metrics, predictions = evaluate_grounding(cfg, predictor)
    metrics = dict(metrics, checkpoint=cfg.checkpoint, checkpoint_sha256=sha, kind=cfg.kind.value,
                   seconds=round(time.time() - t0, 2))
    paths = write_results(cfg.output, cfg.name, metrics, predictions, cfg.storage_options)
    metrics["written"] = list(paths)
    return metrics
