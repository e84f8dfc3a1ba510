"""Training transforms and the batch collate of the student trainer (docs/model.md §7, official
``data/transforms/build.py``, ``transforms.py``, ``structures/bounding_box.py``).

Per sample, in the official order: decode (EXIF-transposed, the frame the boxes live in) ->
``Resize``: a short side drawn from ``min_size_train``, capped so the long side stays within
``max_size_train`` (``Resize.get_size``, shared with inference as ``model.transforms.resized_size``),
PIL bilinear; boxes scaled per axis (``BoxList.resize``) -> ``RandomHorizontalFlip`` with
``flip_prob``: the image and the boxes only, the text is untouched (no left/right swap, as in the
official code); boxes follow ``BoxList.transpose`` with its legacy ``TO_REMOVE = 1``:
``x1' = W - x2 - 1``, ``x2' = W - x1 - 1`` (the inclusive-pixel convention of the readers'
``x2 = x + w - 1``) -> ``to_tensor`` -> BGR, 0-255, ``(x - mean) / std``.

``collate`` zero-pads the batch bottom/right to a multiple of ``size_divisibility``, tokenises
the captions as the model does (``max_query_len``, ``pad_to_max``) and builds each image's binary
positive map [G, T] from its boxes' character spans (``model.prompts.positive_map``; a box whose
spans fall in truncated text gets an all-zero row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from model.config import InputConfig, ModelConfig
from model.prompts import positive_map, tokenize
from model.transforms import load_image, normalize, pad_batch, resized_size
from stages.schema import Sample

__all__ = ["TrainTransformConfig", "TrainExample", "TrainTransform", "resize_boxes", "hflip_boxes",
           "collate"]

FLIP_TO_REMOVE = 1.0     # official BoxList.transpose(FLIP_LEFT_RIGHT)


@dataclass
class TrainTransformConfig:
    flip_prob: float = 0.5            # AUGMENT.FLIP_PROB_TRAIN

    def validate(self) -> None:
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be a probability, got {self.flip_prob}")


@dataclass
class TrainExample:
    """One transformed sample: the network-input image and its targets in that frame."""
    key: str
    source: str
    image: torch.Tensor                          # [3, h, w] normalised (BGR, 0-255 scale)
    image_size: tuple[int, int]                  # (h, w) after resizing, before batch padding
    original_size: tuple[int, int]               # (h, w) of the decoded image
    boxes: torch.Tensor                          # [G, 4] xyxy in the (h, w) frame
    caption: str
    tokens_positive: list[list[tuple[int, int]]]  # per box, its caption character spans
    flipped: bool
    ignore_spans: Sequence[tuple[int, int]] = ()  # caption spans whose tokens take no token loss
    # [K, 4] xyxy in the (h, w) frame: objects there but unlabelled, whose anchors take no loss
    ignore_regions: torch.Tensor | None = None
    box_loss: bool = True                        # False: its boxes take no regression/centerness loss


def resize_boxes(boxes: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """xyxy [N, 4] scaled per axis from an image of ``from_hw`` to ``to_hw`` (``BoxList.resize``)."""
    rx = float(to_hw[1]) / float(from_hw[1])
    ry = float(to_hw[0]) / float(from_hw[0])
    return boxes * boxes.new_tensor([rx, ry, rx, ry])


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """xyxy [N, 4] mirrored in an image ``width`` wide (legacy ``TO_REMOVE = 1``)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((width - x2 - FLIP_TO_REMOVE, y1, width - x1 - FLIP_TO_REMOVE, y2), dim=-1)


class TrainTransform:
    """``TrainTransform(input_cfg)(sample, rng) -> TrainExample``; ``rng`` draws size and flip."""

    def __init__(self, input_cfg: InputConfig, cfg: TrainTransformConfig | None = None):
        self.input_cfg = input_cfg
        self.cfg = cfg or TrainTransformConfig()
        self.cfg.validate()
        if not input_cfg.min_size_train:
            raise ValueError("input.min_size_train is empty: give at least one short-side size")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> TrainExample:
        if sample.image is None:
            raise ValueError(f"sample {sample.key!r} has no image")
        if sample.caption is None:
            raise ValueError(f"sample {sample.key!r} has no caption (build the prompt first)")
        if len(sample.tokens_positive) != len(sample.boxes):
            raise ValueError(f"sample {sample.key!r}: {len(sample.boxes)} boxes but "
                             f"{len(sample.tokens_positive)} tokens_positive entries")
        pil = load_image(sample.image)
        orig = (pil.height, pil.width)
        if sample.width is not None and sample.height is not None and (sample.height, sample.width) != orig:
            raise ValueError(f"sample {sample.key!r}: the image decodes to {orig[1]}x{orig[0]} but the "
                             f"sample says {sample.width}x{sample.height}; its boxes would not match")
        boxes = torch.as_tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4)
        regions = sample.meta.get("ignore_regions")
        regions = None if not regions else torch.as_tensor(regions, dtype=torch.float32).reshape(-1, 4)

        min_size = int(self.input_cfg.min_size_train[int(rng.integers(len(self.input_cfg.min_size_train)))])
        size = resized_size(orig[0], orig[1], min_size, self.input_cfg.max_size_train)
        if size != orig:
            pil = pil.resize((size[1], size[0]), Image.BILINEAR)
            boxes = resize_boxes(boxes, orig, size)
            regions = None if regions is None else resize_boxes(regions, orig, size)

        flipped = bool(rng.random() < self.cfg.flip_prob)
        if flipped:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = hflip_boxes(boxes, size[1])
            regions = None if regions is None else hflip_boxes(regions, size[1])

        return TrainExample(
            key=sample.key, source=sample.source,
            image=normalize(pil, self.input_cfg.pixel_mean, self.input_cfg.pixel_std),
            image_size=size, original_size=orig, boxes=boxes, caption=sample.caption,
            tokens_positive=[[(int(s), int(e)) for s, e in spans] for spans in sample.tokens_positive],
            flipped=flipped,
            ignore_spans=[(int(s), int(e)) for s, e in sample.meta.get("ignore_spans", ())],
            ignore_regions=regions, box_loss=bool(sample.meta.get("box_loss", True)))


def collate(examples: list[TrainExample], tokenizer, model_cfg: ModelConfig) -> dict:
    """Examples -> the trainer's batch.

    ``images`` [B, 3, H, W] (H, W multiples of ``size_divisibility``), ``image_sizes`` [(h, w)],
    ``input_ids`` / ``attention_mask`` [B, T], ``targets``: per image ``{"boxes": [G, 4] float32
    xyxy in the network-input frame, "positive_map": [G, T] float32 0/1}`` and, for an example
    with ``ignore_spans``, ``"ignore_tokens"``: [T] bool, the tokens the token loss skips, and for
    one with ``ignore_regions``, ``"ignore_regions"``: [K, 4] (anchors there take no loss), for one
    whose boxes take no box losses, ``"box_loss"``: a False bool tensor; plus
    ``captions`` and ``keys``.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    images = pad_batch([ex.image for ex in examples], model_cfg.input.size_divisibility)
    encoding = tokenize(tokenizer, [ex.caption for ex in examples], model_cfg.language.max_query_len,
                        model_cfg.language.pad_to_max)
    num_tokens = encoding["input_ids"].shape[1]
    targets = []
    for b, ex in enumerate(examples):
        target = {"boxes": ex.boxes.to(torch.float32).reshape(-1, 4),
                  "positive_map": positive_map(encoding, ex.tokens_positive, num_tokens, batch_index=b)}
        if ex.ignore_regions is not None and ex.ignore_regions.shape[0]:
            target["ignore_regions"] = ex.ignore_regions.to(torch.float32).reshape(-1, 4)
        if not ex.box_loss:
            target["box_loss"] = torch.tensor(False)
        if ex.ignore_spans:
            target["ignore_tokens"] = positive_map(encoding, [list(ex.ignore_spans)], num_tokens,
                                                   batch_index=b)[0] > 0
        targets.append(target)
    return {"images": images, "image_sizes": [ex.image_size for ex in examples],
            "input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"],
            "targets": targets, "captions": [ex.caption for ex in examples],
            "keys": [ex.key for ex in examples]}
