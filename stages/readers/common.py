"""What the dataset readers share: the format error, field checks, JSON loading, box conventions.

Box conventions (``BoxConvention``). COCO-format files store ``bbox = [x, y, w, h]``. There are
two ways to turn that into corners, and they differ by one pixel:

- ``legacy``: ``x2 = x + w - 1``, ``y2 = y + h - 1``, then clipped to ``[0, W - 1] x [0, H - 1]``.
  The official GLIP (maskrcnn_benchmark, ``TO_REMOVE = 1``; ``modulated_coco.py``) converts both
  COCO/Objects365 detection and MDETR/GoldG boxes this way, and this project's ``model/`` uses
  the same ``+1`` widths (anchors, box coder). It is the default, so boxes reach the loss as
  in the official recipe.
- ``continuous``: ``x2 = x + w``, ``y2 = y + h``, clipped to ``[0, W] x [0, H]``. Exact corners;
  what torchvision, MDETR and the COCO evaluator assume.

Under either convention a box whose corners do not satisfy ``x2 > x1`` and ``y2 > y1`` after
clipping is not a training target (the official code drops it with its token spans); readers
count such boxes in their ``stats`` instead of failing. ``xyxy_to_xywh`` is the inverse, for
writing predictions back to COCO ``xywh`` under the convention they were made in.
"""
from __future__ import annotations

import json
import math
import posixpath
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from core import storage
from model.box_ops import BoxConvention, convention_offset
from stages.schema import DropReason, Sample

__all__ = ["DatasetFormatError", "BoxConvention", "xywh_to_xyxy", "xyxy_to_xywh", "convert_boxes",
           "clipped_mask", "load_json", "join_root", "check_root", "read_bytes", "sample_key", "image_ext"]

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class DatasetFormatError(ValueError):
    """A malformed annotation file. The message names the file, the field and the fix."""


def fail(path: str, field: str, problem: str, fix: str) -> DatasetFormatError:
    """Build the error every reader raises: ``FILE: FIELD: PROBLEM. Fix: FIX``."""
    return DatasetFormatError(f"{path}: {field}: {problem}. Fix: {fix}")


_offset = convention_offset


def xywh_to_xyxy(box, convention: BoxConvention) -> list[float]:
    """One COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` (no clipping)."""
    x, y, w, h = (float(v) for v in box)
    off = _offset(convention)
    return [x, y, x + w - off, y + h - off]


def xyxy_to_xywh(box, convention: BoxConvention) -> list[float]:
    """One ``[x1, y1, x2, y2]`` -> COCO ``[x, y, w, h]``, the inverse of ``xywh_to_xyxy``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    off = _offset(convention)
    return [x1, y1, x2 - x1 + off, y2 - y1 + off]


def convert_boxes(xywh: np.ndarray, width: np.ndarray, height: np.ndarray,
                  convention: BoxConvention) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ``[N, 4]`` xywh -> (xyxy clipped to each box's image, keep mask).

    ``width``/``height`` are per box; NaN means the image size is unknown and that box is not
    clipped. ``keep`` is ``x2 > x1 and y2 > y1`` after clipping.
    """
    xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    off = _offset(convention)
    xyxy = xywh.copy()
    xyxy[:, 2:] = xywh[:, :2] + xywh[:, 2:] - off
    xmax = np.where(np.isnan(width), np.inf, width - off)
    ymax = np.where(np.isnan(height), np.inf, height - off)
    xyxy[:, 0] = np.clip(xyxy[:, 0], 0.0, xmax)
    xyxy[:, 2] = np.clip(xyxy[:, 2], 0.0, xmax)
    xyxy[:, 1] = np.clip(xyxy[:, 1], 0.0, ymax)
    xyxy[:, 3] = np.clip(xyxy[:, 3], 0.0, ymax)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return xyxy, keep


def clipped_mask(xywh: np.ndarray, xyxy: np.ndarray, convention: BoxConvention) -> np.ndarray:
    """Which boxes ``convert_boxes`` changed by clipping them to their image (``[N]`` bool)."""
    xywh = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    raw = xywh.copy()
    raw[:, 2:] = xywh[:, :2] + xywh[:, 2:] - _offset(convention)
    return np.any(np.abs(np.asarray(xyxy).reshape(-1, 4) - raw) > 1e-9, axis=1)


# ---------------------------------------------------------------------------------------------
# field checks (each names the file and field and says what to do)

def as_number(value: Any, path: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(path, field, f"expected a finite number, got {value!r}",
                   "write a plain JSON number here")
    return float(value)


def as_int_like(value: Any, path: str, field: str) -> int:
    """An integer, or a string of digits (MDETR's Flickr file stores sizes as strings)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail(path, field, f"expected an integer, got {value!r}", "write a whole number here")
    return value


def as_id(value: Any, path: str, field: str) -> int | str:
    """An image/category id: an integer or a non-empty string (what pycocotools accepts)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise fail(path, field, f"expected an integer or string id, got {value!r}",
                   "give every entry a unique integer id")
    return value


def as_list(value: Any, path: str, field: str, fix: str) -> list:
    if not isinstance(value, list):
        raise fail(path, field, f"expected a list, got {type(value).__name__}", fix)
    return value


def as_dict(value: Any, path: str, field: str) -> dict:
    if not isinstance(value, dict):
        raise fail(path, field, f"expected an object, got {value!r:.80}",
                   "each entry must be a JSON object with the documented keys")
    return value


def as_box(value: Any, path: str, field: str) -> list[float]:
    """A COCO ``[x, y, w, h]`` with finite numbers and ``w, h >= 0``."""
    if not isinstance(value, list) or len(value) != 4 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise fail(path, field, f"expected 4 numbers [x, y, w, h], got {value!r:.80}",
                   "write the box as [x, y, width, height] in pixels")
    box = [as_number(v, path, f"{field}[{i}]") for i, v in enumerate(value)]
    if box[2] < 0 or box[3] < 0:
        raise fail(path, field, f"negative width or height in {value!r}",
                   "COCO boxes are [x, y, width, height]; was the box written as [x1, y1, x2, y2]?")
    return box


def as_span(value: Any, caption_len: int, path: str, field: str) -> list[int]:
    """A ``[start, end)`` character span that lies inside a caption of ``caption_len`` chars."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
        raise fail(path, field, f"expected a [start, end] pair of integers, got {value!r:.80}",
                   "write character spans as [start, end) offsets into the caption")
    start, end = int(value[0]), int(value[1])
    if not 0 <= start < end <= caption_len:
        raise fail(path, field, f"span [{start}, {end}] is outside the caption "
                   f"({caption_len} characters) or empty",
                   "spans are [start, end) character offsets with 0 <= start < end <= len(caption)")
    return [start, end]


# ---------------------------------------------------------------------------------------------
# I/O: paths and URLs are core.storage's; here only what a reader makes of the bytes

def load_json(path: str | Path, storage_options: dict | None = None) -> Any:
    """Read a whole JSON file (``.gz`` and friends decompressed). A missing file is
    ``FileNotFoundError`` naming it; bad JSON is a ``DatasetFormatError`` with the line and column."""
    path = str(path)
    try:
        data = storage.read_bytes(path, storage_options, compression="infer")
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist; check the path "
                                "(a local path or an fsspec URL such as s3://bucket/file.json)") from None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail(path, "(file)", f"not valid JSON ({exc})",
                   "re-download or re-export the file; it may be truncated") from None


join_root = storage.join_root
read_bytes = storage.read_bytes


def check_root(root: str, key: str, storage_options: dict | None = None) -> None:
    """Stop at once with a message naming the location when an image root is not a folder."""
    if not storage.is_dir(root, storage_options):
        raise FileNotFoundError(f"{key} = {root!r} is not an existing folder; set {key} to the folder "
                                "(or URL prefix) that the images' file_name paths are relative to")


def sample_key(image_id: int | str) -> str:
    """A shard-safe ``Sample.key`` (``[A-Za-z0-9_-]``) for an annotation file's image id."""
    return _UNSAFE_KEY_CHARS.sub("_", str(image_id))


def image_ext(file_name: str) -> str | None:
    ext = posixpath.splitext(file_name)[1].lower().lstrip(".")
    return ext or None


def file_stem(path: str) -> str:
    base = posixpath.basename(str(path).rstrip("/"))
    for suffix in (".json.gz", ".json"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


class ImageSamples:
    """What the COCO and MDETR readers share: ``samples()`` over their images. A reader provides
    ``__len__``, ``__getitem__``, ``image_url(image)``, ``to_sample(image)`` and ``config.storage_options``."""

    def read_image(self, image) -> bytes:
        return read_bytes(self.image_url(image), self.config.storage_options)

    def box_counts(self, index: int) -> tuple[int, int]:
        """Of entry ``index``'s boxes: (left out as wholly outside the image or empty, clipped to it)."""
        i = self._order[index]
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return int(self._outside[start:end].sum()), int(self._clipped[start:end].sum())

    def samples(self, indices: Iterable[int] | None = None, read_images: bool = True) -> Iterator[Sample]:
        """One ``Sample`` per entry (all, or those at ``indices``), image bytes read lazily; a
        missing image file gives a sample dropped as ``no_image`` (named), not an exception."""
        for index in (range(len(self)) if indices is None else indices):
            image = self[index]
            sample = self.to_sample(image)
            if read_images:
                try:
                    sample.image = self.read_image(image)
                except FileNotFoundError as exc:
                    sample.drop(DropReason.NO_IMAGE, f"{self.image_url(image)}: {exc}")
            yield sample
