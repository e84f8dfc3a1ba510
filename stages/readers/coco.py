"""Read a COCO-format detection JSON (COCO, Objects365 v1/v2, ODinW, LVIS) plus an image root.

``CocoDetectionReader(CocoReaderConfig(annotations=..., image_root=...))`` loads and checks the
whole file at once, so a malformed file fails before any work with the file, the field and the
fix named, e.g. ``instances.json: annotations[17].bbox: expected 4 numbers [x, y, w, h], got
[1, 2]. Fix: ...`` or ``annotations[17].image_id: annotation 17 refers to image_id 999 that is
not in images``. It then holds a compact index (boxes in one NumPy array, per-image offsets)
and reads image bytes only when asked, one image at a time:

- ``reader[i]`` / ``iter(reader)`` -> ``CocoImage`` (metadata and boxes, no bytes);
- ``reader.samples(indices=None, read_images=True)`` -> ``Sample`` per image, bytes read lazily
  (a missing image file becomes a ``no_image`` drop, never a crash; other I/O errors propagate);
- ``reader.categories`` ``{id: name}`` in id order, ``reader.category_frequency`` (LVIS
  ``r``/``c``/``f`` when present), ``reader.stats`` (counts of what was read and left out).

Conventions (each a deliberate choice):

- Boxes become ``xyxy`` absolute pixels under ``config.box_convention`` (``legacy``
  ``x2 = x + w - 1`` by default, as the official GLIP; see ``stages.readers.common``), clipped
  to the image when its size is in the file. Boxes that are empty after that are left out of
  the training targets and counted in ``stats["degenerate_boxes"]``.
- ``iscrowd = 1`` regions are not training targets (the official GLIP drops them); they stay
  available as ``CocoImage.crowd_boxes`` and are counted in ``stats["crowd_boxes"]``.
- Images with no annotation are kept (``keep_images_without_boxes``); set it false to drop
  images left without a training box, as the official training sets do.
- A file without ``annotations`` (COCO test-dev ``image_info``) reads as images without boxes.
- LVIS images have ``coco_url`` and no ``file_name``: the file name is then the URL's last two
  parts (``val2017/000000397133.jpg``), so ``image_root`` is the folder holding ``train2017/``
  and ``val2017/``. LVIS ``neg_category_ids`` / ``not_exhaustive_category_ids`` are checked
  and kept on ``CocoImage`` for the federated evaluation.
- ``Sample`` of a detection image: no caption (the prompt is built from category names at
  training time, docs/architecture.md); ``meta`` holds ``image_id``, ``file_name`` and ``category_ids``
  (one per box); ``key`` is the image id made shard-safe.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from stages.readers.common import (BoxConvention, as_box, as_dict, as_id, as_int_like, as_list,
                                   check_root, clipped_mask, convert_boxes, fail, file_stem, image_ext,
                                   ImageSamples, join_root, load_json, sample_key)
from stages.schema import Sample

__all__ = ["CocoReaderConfig", "CocoImage", "CocoDetectionReader"]

LVIS_FREQUENCIES = ("r", "c", "f")


@dataclass
class CocoReaderConfig:
    annotations: str = ""                  # path or fsspec URL of the COCO-format JSON (.json or .json.gz)
    image_root: str = ""                   # folder or URL prefix the images' file_name is relative to
    source: str = ""                       # Sample.source / input_shard; "" -> the JSON file's stem
    box_convention: BoxConvention = BoxConvention.LEGACY
    keep_images_without_boxes: bool = True
    check_image_root: bool = True          # fail at start when image_root is not a folder
    storage_options: dict[str, Any] = field(default_factory=dict)   # fsspec options (endpoint, keys)

    def validate(self) -> None:
        if not self.annotations:
            raise ValueError("annotations is empty: give the path or URL of the COCO-format JSON")
        if not self.image_root:
            raise ValueError("image_root is empty: give the folder (or URL prefix) holding the images")


@dataclass
class CocoImage:
    """One image of the index: metadata and boxes, no pixels."""
    index: int
    image_id: int | str
    file_name: str
    width: int | None
    height: int | None
    boxes: list[list[float]]                  # xyxy training targets (crowd and empty boxes left out)
    category_ids: list[int | str]             # one per box
    annotation_ids: list[Any]                 # one per box (None where the file has no id)
    crowd_boxes: list[list[float]]            # xyxy of iscrowd regions, not targets
    neg_category_ids: list[int | str] | None = None            # LVIS federated fields
    not_exhaustive_category_ids: list[int | str] | None = None


class CocoDetectionReader(ImageSamples):
    def __init__(self, config: CocoReaderConfig) -> None:
        config.validate()
        self.config = config
        self.path = str(config.annotations)
        self.source = config.source or file_stem(self.path)
        self.convention = BoxConvention(config.box_convention)
        self._build(load_json(self.path, config.storage_options))
        if config.check_image_root:
            check_root(config.image_root, "image_root", config.storage_options)

    # -- index --------------------------------------------------------------------------------
    def _build(self, data: Any) -> None:
        path = self.path
        if not isinstance(data, dict):
            raise fail(path, "(top level)", f"expected an object with images/annotations/categories, "
                       f"got {type(data).__name__}", "give a COCO-format detection file")
        for key in ("images", "categories"):
            if key not in data:
                raise fail(path, key, "missing", "a COCO-format file needs 'images' and 'categories' lists")
        images = as_list(data["images"], path, "images", "write images as a list of objects")
        categories = as_list(data["categories"], path, "categories", "write categories as a list of objects")
        annotations = as_list(data.get("annotations", []), path, "annotations",
                              "write annotations as a list of objects")

        self.categories: dict[int | str, str] = {}
        self.category_frequency: dict[int | str, str] = {}
        first_cat: dict[Any, int] = {}
        for j, cat in enumerate(categories):
            cat = as_dict(cat, path, f"categories[{j}]")
            cid = as_id(cat.get("id"), path, f"categories[{j}].id")
            if cid in first_cat:
                raise fail(path, f"categories[{j}].id", f"category id {cid!r} is used again "
                           f"(first at categories[{first_cat[cid]}])", "give every category a unique id")
            name = cat.get("name")
            if not isinstance(name, str) or not name.strip():
                raise fail(path, f"categories[{j}].name", f"expected a non-empty string, got {name!r}",
                           "give every category its name")
            first_cat[cid] = j
            self.categories[cid] = name
            if "frequency" in cat:
                if cat["frequency"] not in LVIS_FREQUENCIES:
                    raise fail(path, f"categories[{j}].frequency", f"{cat['frequency']!r} is not one of "
                               "'r', 'c', 'f'", "use LVIS's frequency letters or drop the field")
                self.category_frequency[cid] = cat["frequency"]
        self.categories = dict(sorted(self.categories.items(), key=lambda kv: (str(type(kv[0])), kv[0])))

        image_pos: dict[Any, int] = {}
        self._ids: list[int | str] = []
        self._files: list[str] = []
        self._sizes: list[tuple[int | None, int | None]] = []
        self._lvis: list[tuple[list | None, list | None]] = []
        for i, img in enumerate(images):
            img = as_dict(img, path, f"images[{i}]")
            iid = as_id(img.get("id"), path, f"images[{i}].id")
            if iid in image_pos:
                raise fail(path, f"images[{i}].id", f"image id {iid!r} is used again "
                           f"(first at images[{image_pos[iid]}])", "give every image a unique id")
            image_pos[iid] = i
            self._ids.append(iid)
            self._files.append(self._file_name(img, i))
            self._sizes.append(tuple(self._size(img, i, k) for k in ("width", "height")))
            self._lvis.append(tuple(self._cat_list(img, i, k)
                                    for k in ("neg_category_ids", "not_exhaustive_category_ids")))

        n = len(annotations)
        pos = np.empty(n, dtype=np.int64)
        xywh = np.empty((n, 4), dtype=np.float64)
        cat_ids: list[int | str] = []
        crowd = np.zeros(n, dtype=bool)
        ann_ids: list[Any] = []
        for k, ann in enumerate(annotations):
            ann = as_dict(ann, path, f"annotations[{k}]")
            iid = ann.get("image_id")
            try:
                pos[k] = image_pos[iid]
            except (KeyError, TypeError):
                raise fail(path, f"annotations[{k}].image_id", f"annotation {k} refers to image_id "
                           f"{iid!r} that is not in images", "add the image to 'images' or remove the "
                           "annotation") from None
            cid = ann.get("category_id")
            if not isinstance(cid, (int, str)) or isinstance(cid, bool) or cid not in first_cat:
                raise fail(path, f"annotations[{k}].category_id", f"annotation {k} refers to unknown "
                           f"category id {cid!r}", "add the category to 'categories' or fix the id")
            if "bbox" not in ann:
                raise fail(path, f"annotations[{k}].bbox", "missing",
                           "every detection annotation needs a [x, y, w, h] bbox")
            xywh[k] = as_box(ann["bbox"], path, f"annotations[{k}].bbox")
            iscrowd = ann.get("iscrowd", 0)
            if iscrowd not in (0, 1):
                raise fail(path, f"annotations[{k}].iscrowd", f"expected 0 or 1, got {iscrowd!r}",
                           "set iscrowd to 0 (an object) or 1 (a crowd region)")
            crowd[k] = bool(iscrowd)
            cat_ids.append(cid)
            ann_ids.append(ann.get("id"))

        order = np.argsort(pos, kind="stable")
        pos, xywh, crowd = pos[order], xywh[order], crowd[order]
        self._cat_ids = [cat_ids[o] for o in order]
        self._ann_ids = [ann_ids[o] for o in order]
        sizes = np.array([[np.nan if v is None else v for v in s] for s in self._sizes],
                         dtype=np.float64).reshape(-1, 2)
        self._xyxy, keep = convert_boxes(xywh, sizes[pos, 0], sizes[pos, 1], self.convention)
        self._target = keep & ~crowd
        self._crowd = crowd
        self._outside = ~keep & ~crowd          # wholly outside the image (or empty): not a target
        self._clipped = clipped_mask(xywh, self._xyxy, self.convention) & self._target
        self._offsets = np.concatenate([[0], np.cumsum(np.bincount(pos, minlength=len(images)))])

        targets = np.bincount(pos[self._target], minlength=len(images))   # training boxes per image
        if self.config.keep_images_without_boxes:
            self._order = list(range(len(images)))
        else:
            self._order = [i for i in range(len(images)) if targets[i] > 0]
        self.stats = {
            "images_in_file": len(images),
            "images": len(self._order),
            "images_without_boxes": int(np.sum(targets == 0)),
            "annotations": n,
            "boxes": int(self._target.sum()),
            "crowd_boxes": int(crowd.sum()),
            "degenerate_boxes": int((~keep & ~crowd).sum()),
            "clipped_boxes": int(self._clipped.sum()),
        }

    def _file_name(self, img: dict, i: int) -> str:
        name = img.get("file_name")
        if name is None and isinstance(img.get("coco_url"), str):     # LVIS
            name = "/".join(img["coco_url"].rstrip("/").split("/")[-2:])
        if not isinstance(name, str) or not name.strip():
            raise fail(self.path, f"images[{i}].file_name", f"expected a non-empty string, got {name!r}",
                       "give every image its file_name relative to image_root")
        return name

    def _size(self, img: dict, i: int, key: str) -> int | None:
        if img.get(key) is None:
            return None
        value = as_int_like(img[key], self.path, f"images[{i}].{key}")
        if value <= 0:
            raise fail(self.path, f"images[{i}].{key}", f"must be positive, got {value}",
                       "write the image's size in pixels or drop the field")
        return value

    def _cat_list(self, img: dict, i: int, key: str) -> list | None:
        if key not in img:
            return None
        ids = as_list(img[key], self.path, f"images[{i}].{key}", "write a list of category ids")
        for j, cid in enumerate(ids):
            if cid not in self.categories:
                raise fail(self.path, f"images[{i}].{key}[{j}]", f"unknown category id {cid!r}",
                           "list only ids that appear in 'categories'")
        return list(ids)

    # -- access -------------------------------------------------------------------------------
    @property
    def category_names(self) -> list[str]:
        """Names in category-id order (the order the official GLIP builds COCO/ODinW prompts in)."""
        return list(self.categories.values())

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, index: int) -> CocoImage:
        i = self._order[index]
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        target = self._target[start:end]
        crowd = self._crowd[start:end]
        boxes = self._xyxy[start:end]
        width, height = self._sizes[i]
        neg, not_exhaustive = self._lvis[i]
        return CocoImage(
            index=index, image_id=self._ids[i], file_name=self._files[i], width=width, height=height,
            boxes=boxes[target].tolist(),
            category_ids=[c for c, t in zip(self._cat_ids[start:end], target) if t],
            annotation_ids=[a for a, t in zip(self._ann_ids[start:end], target) if t],
            crowd_boxes=boxes[crowd].tolist(),
            neg_category_ids=neg, not_exhaustive_category_ids=not_exhaustive)

    def __iter__(self) -> Iterator[CocoImage]:
        for index in range(len(self)):
            yield self[index]

    def image_url(self, image: CocoImage) -> str:
        return join_root(self.config.image_root, image.file_name)

    def to_sample(self, image: CocoImage, image_bytes: bytes | None = None) -> Sample:
        return Sample(
            key=sample_key(image.image_id), input_shard=self.source, source=self.source,
            image=image_bytes, image_ext=image_ext(posixpath.basename(image.file_name)),
            width=image.width, height=image.height, boxes=image.boxes,
            meta={"image_id": image.image_id, "file_name": image.file_name,
                  "category_ids": list(image.category_ids)})
