"""The teacher stage: GLIP grounds each caption's noun phrases; confident boxes become labels.

Recipe (DESIGN.md, "Pseudo-labelling recipe"): the prompt is the caption and each noun phrase
(its character span) an entity; a box's score for a phrase is the mean probability of the
phrase's tokens, combined with centerness as the official inference does (``model/postprocess``);
boxes of all phrases then go through one class-agnostic NMS (``nms_threshold``; two phrases do
not keep two boxes for one object), and boxes scoring ``>= min_score`` are kept with their scores
(training may raise the bar later without re-running the teacher). A sample left with no box is
dropped ``no_boxes``.

Phrases past the text limit (``language.max_query_len`` tokens) cannot be scored: they are
removed before the teacher runs and counted in ``sample.meta["phrases_truncated"]``; a sample
that loses every phrase this way is dropped ``no_phrases``.

Boxes are absolute ``xyxy`` in the stored image's frame after EXIF orientation (the predictor
decodes the original bytes with ``exif_transpose``), clipped to the image with the legacy
convention (x2 <= W - 1); boxes under a pixel wide or high are dropped.
"""
from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from model.config import CheckpointFormat
from stages.base import BaseStage, Resources
from stages.schema import DropReason, Sample


class Precision(str, enum.Enum):
    AUTO = "auto"      # bf16 autocast on GPU, float32 on CPU
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


@dataclass
class PseudoLabelConfig:
    # The teacher: a checkpoint (local path or fsspec URL) and, for official checkpoints, the
    # model config it belongs to (glip_t / glip_l / a YAML path). Ours carry their own config.
    checkpoint: str = ""
    checkpoint_format: CheckpointFormat = CheckpointFormat.AUTO
    model: str = "glip_t"
    model_overrides: list[str] = field(default_factory=list)   # e.g. [input.min_size_test=600]
    min_score: float = 0.5
    nms_threshold: float | None = 0.6       # class-agnostic NMS across phrases; null disables
    max_boxes: int = 32                     # per image, best first
    max_boxes_per_phrase: int = 0           # best first; 0 = no limit (a caption's "a red circle" is one object)
    batch_size: int = 8
    device: str = "auto"                    # auto = cuda when available, else cpu
    precision: Precision = Precision.AUTO
    # per actor: num_gpus GPUs when the Ray cluster has GPUs, else the teacher runs on CPU
    resources: Resources = field(default_factory=lambda: Resources(actors=1, num_cpus=0.5, num_gpus=1.0))

    def validate(self) -> None:
        if not self.checkpoint:
            raise ValueError("pseudo_label.checkpoint is empty: give the teacher's checkpoint "
                             "(a folder written by save_pretrained or an official GLIP .pth)")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"pseudo_label.min_score must be in [0, 1], got {self.min_score}")
        if self.batch_size < 1 or self.max_boxes < 1:
            raise ValueError("pseudo_label.batch_size and pseudo_label.max_boxes must be >= 1")
        if self.max_boxes_per_phrase < 0:
            raise ValueError("pseudo_label.max_boxes_per_phrase must be >= 0 (0 = no limit)")


def top_per_label(scores: list[float], labels: list[int], k: int) -> list[int]:
    """Indices of the ``k`` best-scoring boxes of each label, best first overall (ties: input order)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    taken: dict[int, int] = {}
    keep = []
    for i in order:
        if taken.get(labels[i], 0) < k:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            keep.append(i)
    return keep


class PseudoLabel(BaseStage):
    name = "pseudo_label"

    def __init__(self, config: PseudoLabelConfig) -> None:
        super().__init__(config)
        self.predictor = None
        self.labeler: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        import torch

        from model.load import load_glip
        from model.predictor import Predictor
        from core.config import to_dict

        cfg = self.config
        model, checkpoint_sha = load_glip(cfg.checkpoint, cfg.checkpoint_format, cfg.model,
                                          cfg.model_overrides)
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        precision = cfg.precision
        if precision is Precision.AUTO:
            precision = Precision.BF16 if self.device.type == "cuda" else Precision.FP32
        self.dtype = {Precision.FP32: None, Precision.BF16: torch.bfloat16,
                      Precision.FP16: torch.float16}[precision]
        self.predictor = Predictor(model, device=self.device, batch_size=cfg.batch_size)
        model_cfg = to_dict(model.cfg)
        self.max_len = model.cfg.language.max_query_len
        self.labeler = {
            "model": model.cfg.name,
            "checkpoint_sha256": checkpoint_sha,
            "config_sha256": hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest(),
            "min_score": cfg.min_score,
            "nms_threshold": cfg.nms_threshold,
            "max_boxes_per_phrase": cfg.max_boxes_per_phrase,
        }
        self._ready = True

    # ------------------------------------------------------------------------------ call
    def _fit_phrases(self, sample: Sample) -> None:
        """Remove phrases whose span ends past the text limit; count them."""
        tok = self.predictor.model.tokenizer
        enc = tok(sample.caption, truncation=True, max_length=self.max_len, return_offsets_mapping=True)
        ends = [e for s, e in enc["offset_mapping"] if e > s]
        limit = max(ends) if ends else 0
        fitting = [p for p in sample.phrases if p.span[1] <= limit]
        sample.meta["phrases_truncated"] = len(sample.phrases) - len(fitting)
        sample.phrases = fitting

    def _label(self, sample: Sample, det) -> None:
        from torchvision.ops import nms

        cfg = self.config
        boxes, scores, labels = det.boxes.float(), det.scores.float(), det.labels
        if boxes.numel() and cfg.nms_threshold is not None:
            # legacy +1 IoU as everywhere in GLIP: NMS on boxes grown by one pixel
            grown = boxes.clone()
            grown[:, 2:] += 1
            keep = nms(grown, scores, cfg.nms_threshold)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        # clip to the image (legacy convention: the last pixel is W-1) and drop boxes that are
        # less than a pixel wide or high after clipping (useless as targets, readers drop them)
        w, h = sample.width, sample.height
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
        keep = (scores >= cfg.min_score) & (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if cfg.max_boxes_per_phrase:
            top = top_per_label(scores.tolist(), labels.tolist(), cfg.max_boxes_per_phrase)
            boxes, scores, labels = boxes[top], scores[top], labels[top]
        boxes, scores, labels = boxes[: cfg.max_boxes], scores[: cfg.max_boxes], labels[: cfg.max_boxes]
        sample.boxes = [[round(float(v), 2) for v in b] for b in boxes.tolist()]
        sample.scores = [round(float(s), 4) for s in scores.tolist()]
        sample.tokens_positive = [[list(sample.phrases[int(i)].span)] for i in labels.tolist()]
        sample.labeler = self.labeler
        if not sample.boxes:
            sample.drop(DropReason.NO_BOXES)

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        import contextlib

        import torch

        self.ensure_setup()
        todo = []
        for sample in batch:
            if not sample.kept:
                continue
            try:
                self._fit_phrases(sample)
            except Exception as exc:  # noqa: BLE001
                sample.drop(DropReason.STAGE_ERROR, f"{self.name}: {type(exc).__name__}: {exc}")
                continue
            if not sample.phrases:
                sample.drop(DropReason.NO_PHRASES, "every phrase is past the text limit")
                continue
            todo.append(sample)
        if not todo:
            return batch
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            dets = self.predictor.ground([s.image for s in todo], [s.caption for s in todo],
                                         [[list(p.span) for p in s.phrases] for s in todo])
        for sample, det in zip(todo, dets):
            try:
                self._label(sample, det)
            except Exception as exc:  # noqa: BLE001
                sample.drop(DropReason.STAGE_ERROR, f"{self.name}: {type(exc).__name__}: {exc}")
        return batch
