"""Inference preprocessing, as the official test pipeline (spec §2, §7), and its inverse for boxes.

image (RGB) -> resize so the short side is ``min_size`` unless the long side would exceed
``max_size`` (maskrcnn_benchmark ``Resize.get_size``; PIL bilinear, as torchvision's ``F.resize``
on a PIL image) -> ``to_tensor`` (/255) -> BGR, x255 -> ``(x - mean) / std`` -> batch zero-padded
bottom/right to a multiple of ``size_divisibility``.

The arithmetic is the official one step for step (divide by 255, then multiply by 255), so the
network sees bit-identical inputs. Boxes predicted in the resized frame go back to the original
frame with ``boxes_to_original`` (official ``BoxList.resize``: a plain per-axis scale).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from model.config import InputConfig



def load_image(image) -> Image.Image:
    """PIL image / HxWx3 uint8 RGB array / path / encoded bytes -> RGB PIL image.

    Files and bytes are EXIF-transposed (the project's frame convention: boxes live in the frame
    after EXIF orientation); PIL images and arrays are taken as given.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB array, got shape {image.shape} dtype {image.dtype}")
        return Image.fromarray(np.ascontiguousarray(image[:, :, :3]), mode="RGB")
    if isinstance(image, (bytes, bytearray)):
        return ImageOps.exif_transpose(Image.open(io.BytesIO(image))).convert("RGB")
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def resized_size(height: int, width: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """Official ``Resize.get_size``: (h, w) -> (new_h, new_w)."""
    size = min_size
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def normalize(image: Image.Image, mean, std) -> torch.Tensor:
    """RGB PIL -> [3, H, W] float32: BGR, 0-255 scale, (x - mean) / std (mean/std in BGR order)."""
    arr = np.asarray(image, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    t = t[[2, 1, 0]] * 255
    mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    return t.sub(mean).div(std)


def pad_batch(images: list[torch.Tensor], divisibility: int) -> torch.Tensor:
    """[3, h_i, w_i] list -> [B, 3, H, W] zero-padded bottom/right; H, W multiples of divisibility."""
    if not images:
        raise ValueError("pad_batch needs at least one image")
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    if divisibility > 0:
        h, w = math.ceil(h / divisibility) * divisibility, math.ceil(w / divisibility) * divisibility
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]].copy_(im)
    return out


def boxes_to_original(boxes: torch.Tensor, resized_hw: tuple[int, int],
                      original_hw: tuple[int, int]) -> torch.Tensor:
    """xyxy [N, 4] in the resized frame -> the original frame (official ``BoxList.resize``)."""
    rx = float(original_hw[1]) / float(resized_hw[1])
    ry = float(original_hw[0]) / float(resized_hw[0])
    return boxes * boxes.new_tensor([rx, ry, rx, ry])


def boxes_to_resized(boxes: torch.Tensor, original_hw: tuple[int, int],
                     resized_hw: tuple[int, int]) -> torch.Tensor:
    """xyxy [N, 4] in the original frame -> the resized frame (the inverse of the above)."""
    return boxes_to_original(boxes, original_hw, resized_hw)


@dataclass
class ImageBatch:
    images: torch.Tensor                     # [B, 3, H, W] normalised, zero-padded
    image_sizes: list[tuple[int, int]]       # (h, w) after resizing, before padding
    original_sizes: list[tuple[int, int]]    # (h, w) of the inputs


class Preprocessor:
    """Images -> ``ImageBatch`` with the config's test sizes (or ``min_size``/``max_size``)."""

    def __init__(self, cfg: InputConfig, min_size: int | None = None, max_size: int | None = None):
        self.cfg = cfg
        self.min_size = cfg.min_size_test if min_size is None else min_size
        self.max_size = cfg.max_size_test if max_size is None else max_size

    def transform(self, image) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """One image -> (normalised [3, h, w], resized (h, w), original (h, w))."""
        pil = load_image(image)
        orig = (pil.height, pil.width)
        h, w = resized_size(*orig, self.min_size, self.max_size)
        if (h, w) != orig:
            pil = pil.resize((w, h), Image.BILINEAR)
        return normalize(pil, self.cfg.pixel_mean, self.cfg.pixel_std), (h, w), orig

    def __call__(self, images: list) -> ImageBatch:
        items = [self.transform(im) for im in images]
        return ImageBatch(pad_batch([t for t, _, _ in items], self.cfg.size_divisibility),
                          [s for _, s, _ in items], [o for _, _, o in items])
