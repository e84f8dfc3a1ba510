"""The teacher stage: GLIP grounds each caption's noun phrases; confident boxes become labels.

Recipe: the prompt is the caption and each noun phrase (its character span) an entity; a box's
score for a phrase is the mean probability of the phrase's tokens, combined with centerness as
the official inference does (``model/postprocess``); boxes of all phrases then go through one
class-agnostic NMS (``nms_threshold``; two phrases do not keep two boxes for one object), and
boxes scoring ``>= min_score`` are kept with their scores (training may raise the bar later
without re-running the teacher). A sample left with no box is dropped ``no_boxes``.

Phrases past the text limit (``language.max_query_len`` tokens) cannot be scored: they are
removed before the teacher runs and counted in ``sample.meta["phrases_truncated"]``; a sample
that loses every phrase this way is dropped ``no_phrases``.

Boxes are absolute ``xyxy`` in the stored image's frame after EXIF orientation, clipped to the
image with the legacy convention (x2 <= W - 1); boxes under a pixel wide or high are dropped.

A shard streams through ``stages/teacher_feed.py`` (CPU threads: decode, shape grouping, prompts
padded to the batch's longest) and ``stages/teacher_device.py`` (resize, normalise, pad, forward,
OOM back-off); post-processing runs beside the next forward. ``stats`` counts the padding.
"""
from __future__ import annotations

import enum
import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.device import Device, Precision
from model.config import CheckpointFormat
from model.transforms import ResizeAt
from stages.base import BaseStage, Resources
from stages.schema import DropReason, Sample
from stages.teacher_precision import PrecisionPolicy


class TextPadding(str, enum.Enum):
    LONGEST = "longest"   # prompts padded to the batch's longest (same labels, fewer FLOPs)
    MAX = "max"           # padded to language.max_query_len (the official PAD_MAX)


class PhraseAssignment(str, enum.Enum):
    """How a caption's phrases get their boxes."""
    BEST = "best"              # each phrase its own best boxes (max_boxes_per_phrase), independently
    # one object per phrase and one phrase per object: the assignment of the highest total score
    # (the "educated guess": a phrase the teacher barely knows goes to the object that the phrases
    # it knows do not explain, not onto theirs); implies one box per phrase
    EXCLUSIVE = "exclusive"


class Compile(str, enum.Enum):
    NONE = "none"
    DEFAULT = "default"
    MAX_AUTOTUNE = "max-autotune"


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
    assignment: PhraseAssignment = PhraseAssignment.BEST
    batch_size: int = 8
    device: Device = Device.AUTO            # auto = cuda when available, else cpu
    # fp32 by default: bf16 autocast moved the labels (benchmarks/precision.py, benchmarks/RESULTS.md:
    # 68% of boxes kept with everything in bf16, 94% with the image backbone in fp32, goal 98%).
    # bf16 is opt-in, with ``precision_policy`` naming the modules that stay fp32.
    precision: Precision = Precision.FP32
    precision_policy: PrecisionPolicy = PrecisionPolicy.FP32_BACKBONE
    # The CPU side (decode, EXIF, tokenisation): threads; 0 = the CPUs this process may use.
    cpu_workers: int = 0
    prefetch: int = 2                       # batches ready ahead of the device (>= 2)
    group_window: int = 4                   # batches' worth of images grouped by shape at once
    resize_at: ResizeAt = ResizeAt.DEVICE   # device: within 1 grey level of PIL; cpu: bit-identical
    text_padding: TextPadding = TextPadding.LONGEST
    compile: Compile = Compile.NONE         # torch.compile mode (GPU; slow to compile on CPU)
    channels_last: bool = False             # the image backbone and its input in channels_last
    # the feed's threads and queue depth never change the labels (windows are cut in input order)
    runtime_fields: ClassVar[tuple[str, ...]] = ("cpu_workers", "prefetch")
    # the labels depend on the checkpoint's bytes, not on where it lies: a run whose checkpoint
    # moved (a workdir moved with it) still resumes
    content_fields: ClassVar[tuple[str, ...]] = ("checkpoint",)
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
        if self.cpu_workers < 0:
            raise ValueError("pseudo_label.cpu_workers must be >= 0 (0 = the CPUs this process may use)")
        if self.prefetch < 2 or self.group_window < 1:
            raise ValueError("pseudo_label.prefetch must be >= 2 and pseudo_label.group_window >= 1")

    def workers(self) -> int:
        """The CPU threads of the feed: ``cpu_workers`` or, for 0, the CPUs this process may use."""
        if self.cpu_workers:
            return self.cpu_workers
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


def exclusive_assignment(boxes, scores: list[float], labels: list[int], iou_threshold: float) -> list[int]:
    """Indices of the candidates (``boxes`` [K, 4] xyxy tensor, their ``scores`` and phrase
    ``labels``) that give each phrase at most one object and each object at most one phrase, with
    the highest total score; best first. An object is a cluster of class-agnostic NMS at
    ``iou_threshold`` (its kept box and the candidates it suppresses, any phrase); a phrase's
    candidate there is its best-scoring one in the cluster. Exact (dynamic programme over the
    objects and the subsets of phrases)."""
    import torch
    from torchvision.ops import box_iou, nms

    if not len(scores):
        return []
    grown = boxes.clone().float()
    grown[:, 2:] += 1
    keepers = nms(grown, torch.tensor(scores, dtype=torch.float32), iou_threshold).tolist()
    iou = box_iou(grown, grown[keepers])                          # [K, objects]
    best: dict[tuple[int, int], int] = {}                         # (object, phrase) -> candidate
    for i, (score, label) in enumerate(zip(scores, labels)):
        j = int(iou[i].argmax())
        if iou[i, j] < iou_threshold and i not in keepers:
            continue
        if (j, label) not in best or score > scores[best[j, label]]:
            best[j, label] = i
    phrases = sorted(set(labels))
    bit = {p: 1 << k for k, p in enumerate(phrases)}
    states: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}    # phrase mask -> (total, picks)
    for j in range(len(keepers)):
        options = [(p, i) for (jj, p), i in best.items() if jj == j]
        nxt = dict(states)
        for mask, (total, picks) in states.items():
            for p, i in options:
                if mask & bit[p]:
                    continue
                cand = (total + scores[i], picks + (i,))
                if cand[0] > nxt.get(mask | bit[p], (-1.0,))[0]:
                    nxt[mask | bit[p]] = cand
        states = nxt
    picks = max(states.values(), key=lambda v: v[0])[1]
    return sorted(picks, key=lambda i: -scores[i])


class PseudoLabel(BaseStage):
    name = "pseudo_label"
    config_class = PseudoLabelConfig

    def __init__(self, config: PseudoLabelConfig, model=None) -> None:
        """``model``: a built GLIP to label with instead of loading ``config.checkpoint``
        (benchmarks; its labeler records no checkpoint hash)."""
        super().__init__(config)
        self._model = model
        self.predictor = None
        self.labeler: dict[str, Any] | None = None
        self.stats: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        import torch

        from core.config import to_dict
        from core.device import resolve_device, resolve_precision
        from model.load import load_glip
        from model.postprocess import PostProcessor
        from model.predictor import Predictor
        from stages.teacher_device import DeviceRunner
        from stages.teacher_precision import apply_policy

        cfg = self.config
        if self._model is not None:
            model, checkpoint_sha = self._model, None
        else:
            cfg.validate()
            model, checkpoint_sha = load_glip(cfg.checkpoint, cfg.checkpoint_format, cfg.model,
                                              cfg.model_overrides)
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.predictor = Predictor(model, device=self.device, batch_size=cfg.batch_size)
        self.model = self.predictor.model
        if self.precision is not Precision.FP32:
            apply_policy(self.model, cfg.precision_policy)
        if cfg.channels_last:
            self.model.backbone.to(memory_format=torch.channels_last)
        forward = self.model
        if cfg.compile is not Compile.NONE:
            forward = torch.compile(self.model, mode=cfg.compile.value, dynamic=True)
        self.runner = DeviceRunner(forward, self.device, self.precision, model.cfg.input, cfg.batch_size,
                                   cfg.channels_last)
        self.postprocess = PostProcessor(model.cfg.inference)
        self.max_len = model.cfg.language.max_query_len
        model_cfg = to_dict(model.cfg)
        self.labeler = {
            "model": model.cfg.name,
            "checkpoint_sha256": checkpoint_sha,
            "config_sha256": hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest(),
            "min_score": cfg.min_score,
            "nms_threshold": cfg.nms_threshold,
            "max_boxes_per_phrase": cfg.max_boxes_per_phrase,
            "assignment": cfg.assignment.value,
        }
        self.stats = {"images": 0, "batches": 0, "padded_fraction": 0.0, "oom_retries": 0,
                      "cpu_s": 0.0, "device_s": 0.0}
        self._ready = True

    # ------------------------------------------------------------------------------ CPU side
    def _fit_phrases(self, sample: Sample) -> None:
        """Remove phrases whose span ends past the text limit; count them."""
        tok = self.model.tokenizer
        enc = tok(sample.caption, truncation=True, max_length=self.max_len, return_offsets_mapping=True)
        ends = [e for s, e in enc["offset_mapping"] if e > s]
        limit = max(ends) if ends else 0
        fitting = [p for p in sample.phrases if p.span[1] <= limit]
        sample.meta["phrases_truncated"] = len(sample.phrases) - len(fitting)
        sample.phrases = fitting

    def _items(self, samples: list[Sample]):
        """Feed items for the samples the teacher can label (runs in the feed's thread)."""
        from model.prompts import Prompt
        from stages.teacher_feed import FeedItem

        for i, sample in enumerate(samples):
            try:
                self._fit_phrases(sample)
            except Exception as exc:  # noqa: BLE001
                sample.drop(DropReason.STAGE_ERROR, f"{self.name}: {type(exc).__name__}: {exc}")
                continue
            if not sample.phrases:
                sample.drop(DropReason.NO_PHRASES, "every phrase is past the text limit")
                continue
            spans = [[tuple(p.span)] for p in sample.phrases]
            yield FeedItem(i, sample.image, Prompt(sample.caption, spans, list(range(len(spans)))))

    def _label(self, sample: Sample, det) -> None:
        """One image's detections (boxes in its original frame, best first; any device) -> labels."""
        from torchvision.ops import nms

        cfg = self.config
        boxes, scores, labels = det.boxes.float(), det.scores.float(), det.labels
        if boxes.numel() and cfg.nms_threshold is not None and cfg.assignment is PhraseAssignment.BEST:
            # legacy +1 IoU as everywhere in GLIP: NMS on boxes grown by one pixel
            grown = boxes.clone()
            grown[:, 2:] += 1
            keep = nms(grown, scores, cfg.nms_threshold)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        boxes, scores, labels = boxes.cpu(), scores.cpu(), labels.cpu()
        exclusive = cfg.assignment is PhraseAssignment.EXCLUSIVE
        # clip to the image (legacy convention: the last pixel is W-1) and drop boxes that are
        # less than a pixel wide or high after clipping (useless as targets, readers drop them)
        w, h = sample.width, sample.height
        candidates, best = len(scores), (float(scores.max()) if scores.numel() else None)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
        # exclusive: every candidate takes part in the assignment (a phrase's right box may score
        # below min_score and still free the object its wrong one would take); min_score after
        keep = ((scores >= cfg.min_score) | exclusive) & (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if exclusive:
            top = exclusive_assignment(boxes, scores.tolist(), labels.tolist(),
                                       0.5 if cfg.nms_threshold is None else cfg.nms_threshold)
            top = [i for i in top if scores[i] >= cfg.min_score]
            boxes, scores, labels = boxes[top], scores[top], labels[top]
        elif cfg.max_boxes_per_phrase:
            top = top_per_label(scores.tolist(), labels.tolist(), cfg.max_boxes_per_phrase)
            boxes, scores, labels = boxes[top], scores[top], labels[top]
        boxes, scores, labels = boxes[: cfg.max_boxes], scores[: cfg.max_boxes], labels[: cfg.max_boxes]
        sample.boxes = [[round(float(v), 2) for v in b] for b in boxes.tolist()]
        sample.scores = [round(float(s), 4) for s in scores.tolist()]
        sample.tokens_positive = [[list(sample.phrases[int(i)].span)] for i in labels.tolist()]
        sample.labeler = self.labeler
        if not sample.boxes:
            best_text = "no candidate box" if best is None else f"best score {best:.3f} of {candidates} candidates"
            sample.drop(DropReason.NO_BOXES, f"no box of its {len(sample.phrases)} phrases kept at min_score "
                        f"{cfg.min_score} ({best_text})")

    # --------------------------------------------------------------------------- device side
    @property
    def forward(self):
        """The network call (the model, or its ``torch.compile`` wrapper)."""
        return self.runner.forward

    @forward.setter
    def forward(self, fn) -> None:
        self.runner.forward = fn

    def _infer(self, batch):
        return self.runner.infer(batch)

    def _finish(self, samples: list[Sample], batch, parts, event, stream) -> None:
        """Post-process on the device (its own stream on CUDA), then label: runs beside the
        next batch's forward."""
        import contextlib

        import torch

        from model.predictor import Detections
        from model.transforms import boxes_to_original

        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            if event is not None:
                stream.wait_event(event)
            for rows, out in parts:
                maps = batch.positive_maps[rows.start:rows.stop]
                results = self.postprocess(out, maps, batch.resized[rows.start:rows.stop])
                for j, r in zip(rows, results):
                    sample = samples[batch.indices[j]]
                    try:
                        boxes = boxes_to_original(r["boxes"], batch.resized[j], batch.original[j])
                        order = r["scores"].argsort(descending=True, stable=True)
                        self._label(sample, Detections(boxes[order], r["scores"][order], r["labels"][order]))
                    except Exception as exc:  # noqa: BLE001
                        sample.drop(DropReason.STAGE_ERROR, f"{self.name}: {type(exc).__name__}: {exc}")

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        import torch

        from stages.teacher_feed import TeacherFeed

        self.ensure_setup()
        todo = [s for s in batch if s.kept]
        if not todo:
            return batch
        cfg, icfg, lang = self.config, self.model.cfg.input, self.model.cfg.language
        feed = TeacherFeed(self.model.tokenizer, device=self.device, min_size=self.predictor.preprocess.min_size,
                           max_size=self.predictor.preprocess.max_size, divisibility=icfg.size_divisibility,
                           max_query_len=lang.max_query_len, pad_to_max=cfg.text_padding is TextPadding.MAX,
                           batch_size=cfg.batch_size, workers=cfg.workers(), prefetch=cfg.prefetch,
                           window=cfg.group_window, resize_at=cfg.resize_at)
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pending: deque = deque()
        device_s = 0.0
        with ThreadPoolExecutor(1, thread_name_prefix="teacher-finish") as finish, torch.inference_mode():
            try:
                for fb in feed.batches(self._items(todo)):
                    start = time.perf_counter()
                    parts, event = self._infer(fb)
                    device_s += time.perf_counter() - start
                    pending.append(finish.submit(self._finish, todo, fb, parts, event, stream))
                    while len(pending) > 1:          # one batch post-processes beside the next forward
                        pending.popleft().result()
            finally:
                for job in pending:
                    job.result()
        for index, exc in feed.errors.items():
            todo[index].drop(DropReason.STAGE_ERROR, f"{self.name}: {type(exc).__name__}: {exc}")
        self._record(feed.stats, device_s)
        return batch

    def _record(self, fs, device_s: float) -> None:
        s = self.stats
        real = s.get("_real", 0) + fs.real_pixels
        padded = s.get("_padded", 0) + fs.padded_pixels
        s.update(_real=real, _padded=padded, images=s["images"] + fs.images, batches=s["batches"] + fs.batches,
                 padded_fraction=round(1 - real / padded, 4) if padded else 0.0,
                 cpu_s=round(s["cpu_s"] + fs.cpu_s, 4), device_s=round(s["device_s"] + device_s, 4),
                 oom_retries=self.runner.oom_retries)


STAGE = PseudoLabel      # found by stages.registry under the module's name
