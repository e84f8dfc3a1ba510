"""Inference preprocessing, as the official test pipeline (docs/model.md §2, §7), and its inverse for boxes.

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


# --------------------------------------------------------------------------- the teacher's feed
# The split used by the labelling stage: the CPU decodes (at a reduced JPEG scale when the target
# is at most half the stored size), EXIF-transposes and hands over uint8 pixels; the device
# resizes, normalises and pads. ``ResizeAt.CPU`` resizes with PIL on the CPU instead, which makes
# the network's input bit-identical to ``Preprocessor``'s.

import enum  # noqa: E402

EXIF_ORIENTATION = 0x0112


class ResizeAt(str, enum.Enum):
    DEVICE = "device"   # uint8 at the decoded size cross over; bilinear on the device (within 1 grey level)
    CPU = "cpu"         # PIL bilinear on the CPU, as the official pipeline (bit-identical input)


@dataclass
class DecodedImage:
    pixels: np.ndarray               # [h, w, 3] uint8 RGB, C-contiguous: what crosses to the device
    resized: tuple[int, int]         # (h, w) the network sees (before padding)
    original: tuple[int, int]        # (h, w) after EXIF orientation: the frame boxes go back to


def decode_for_device(image, min_size: int, max_size: int | None,
                      resize_at: ResizeAt = ResizeAt.DEVICE) -> DecodedImage:
    """One image (bytes / path / PIL / array) -> uint8 pixels and the sizes (see ``ResizeAt``).

    With ``ResizeAt.DEVICE``, encoded JPEGs whose target is at most half their size are decoded
    with PIL ``draft`` (the DCT scales by 1/2, 1/4 or 1/8, never below the target); the device's
    antialiased bilinear resize then reaches the target size.
    """
    if isinstance(image, (bytes, bytearray, str, Path)):
        src = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
        with Image.open(src) as im:
            orientation = im.getexif().get(EXIF_ORIENTATION, 1) if im.format in ("JPEG", "PNG", "WEBP", "TIFF") else 1
            w, h = im.size
            if orientation in (5, 6, 7, 8):
                w, h = h, w
            original = (h, w)
            target = resized_size(h, w, min_size, max_size)
            if resize_at is ResizeAt.DEVICE and im.format == "JPEG" and 2 * target[0] <= h and 2 * target[1] <= w:
                stored = (target[1], target[0]) if orientation in (5, 6, 7, 8) else (target[0], target[1])
                im.draft("RGB", (stored[1], stored[0]))
            pil = ImageOps.exif_transpose(im).convert("RGB")
    else:
        pil = load_image(image)
        original = (pil.height, pil.width)
        target = resized_size(*original, min_size, max_size)
    if resize_at is ResizeAt.CPU and (pil.height, pil.width) != target:
        pil = pil.resize((target[1], target[0]), Image.BILINEAR)
    return DecodedImage(np.ascontiguousarray(np.asarray(pil, dtype=np.uint8)), target, original)


def _resize_like_pil(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, h, w] float (0-255 values) -> [3, H, W]: PIL's bilinear resize (separable, horizontal
    pass first, antialiased when shrinking, each pass rounded to uint8 levels)."""
    import torch.nn.functional as F

    if x.shape[2] != size[1]:
        x = F.interpolate(x[None], size=(x.shape[1], size[1]), mode="bilinear", align_corners=False,
                          antialias=True)[0].round_().clamp_(0, 255)
    if x.shape[1] != size[0]:
        x = F.interpolate(x[None], size=(size[0], x.shape[2]), mode="bilinear", align_corners=False,
                          antialias=True)[0].round_().clamp_(0, 255)
    return x


def device_batch(pixels: torch.Tensor, shapes: list[tuple[int, int]], resized: list[tuple[int, int]],
                 mean, std, divisibility: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The device side of the feed: flat uint8 pixels -> the network's padded input.

    pixels: [sum(h_i * w_i * 3)] uint8 (image i is [h_i, w_i, 3] RGB at ``shapes[i]``, packed one
    after the other); resized: the (h, w) each image is resized to. Returns [B, 3, H, W]
    ``out_dtype``: BGR, 0-255, ``(x - mean) / std``, zero-padded bottom/right to a multiple of
    ``divisibility`` -- the same arithmetic as ``normalize`` + ``pad_batch``.
    """
    if not shapes:
        raise ValueError("device_batch needs at least one image")
    h = max(s[0] for s in resized)
    w = max(s[1] for s in resized)
    if divisibility > 0:
        h, w = math.ceil(h / divisibility) * divisibility, math.ceil(w / divisibility) * divisibility
    out = torch.zeros((len(shapes), 3, h, w), dtype=out_dtype, device=pixels.device)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device)[:, None, None]
    std = torch.as_tensor(std, dtype=torch.float32, device=pixels.device)[:, None, None]
    offset = 0
    for i, ((sh, sw), (rh, rw)) in enumerate(zip(shapes, resized)):
        n = sh * sw * 3
        x = pixels[offset: offset + n].view(sh, sw, 3).permute(2, 0, 1).to(torch.float32)
        offset += n
        if (sh, sw) != (rh, rw):
            x = _resize_like_pil(x, (rh, rw))
        x = x.div(255).flip(0) * 255            # RGB -> BGR without an index tensor (no host copy)
        out[i, :, :rh, :rw].copy_(x.sub_(mean).div_(std))
    return out
