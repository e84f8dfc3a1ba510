"""Read an MDETR-format grounding JSON (GoldG: Flickr30k entities, GQA/VG mixed) plus image roots.

The MDETR format is COCO-like: ``images[*]`` carry the ``caption`` (one entry per caption, so
one photo appears once per sentence) and ``annotations[*]`` carry ``bbox`` (xywh) and
``tokens_positive``: the ``[start, end)`` character spans of the caption that the box grounds.
Flickr30k files add per-caption evaluation fields: ``tokens_positive_eval`` (one list of spans
per phrase that has boxes, in sentence order), ``sentence_id`` and ``original_img_id``; the
mixed file adds ``data_source`` (``coco`` or ``vg``: which image folder holds the file).

``MdetrGroundingReader(MdetrReaderConfig(annotations=..., image_root=...))`` checks the whole
file at start: every span must be a pair of integers inside its caption, with the file and the
field named (``final_flickr_separateGT_val.json: annotations[5].tokens_positive[1]: span [40, 52]
is outside the caption (38 characters) ...``). Then:

- ``reader[i]`` / ``iter(reader)`` -> ``MdetrImage`` (caption, boxes, spans; no bytes);
- ``reader.samples(indices=None, read_images=True)`` -> grounding ``Sample`` s: ``caption``,
  ``boxes`` (xyxy under ``box_convention``, ``legacy`` by default as the official GLIP does for
  GoldG), ``tokens_positive`` per box, and ``phrases`` = the distinct spans of the boxes, sorted
  by position, each with its caption text. ``meta`` keeps ``image_id``, ``file_name`` and the
  evaluation fields when present. Missing image files become ``no_image`` drops.
- ``reader.grounding_targets()`` -> ``PhraseTarget`` per evaluation phrase: the ground truth
  ``evaluation.grounding.phrase_grounding_recall`` takes (``{t.key: t.boxes}``).

Training targets follow the official GLIP: crowd boxes are left out, and a box that is empty
after conversion and clipping is left out together with its spans (``stats``). Evaluation
targets use the exact corners ``x2 = x + w`` without clipping: MDETR wrote ``w = xmax - xmin``
from the Flickr30k XML, so this gives back the XML boxes that MDETR's evaluator compares with.
A phrase's boxes are the annotations whose ``tokens_positive`` contain one of the phrase's
``tokens_positive_eval`` spans exactly (that is how MDETR's conversion script links them; its
IoU >= 0.95 de-duplication of near-identical boxes is the only difference from the XML).
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from stages.readers.common import (BoxConvention, as_box, as_dict, as_id, as_int_like, as_list,
                                   as_span, check_root, clipped_mask, convert_boxes, fail, file_stem, image_ext,
                                   ImageSamples, join_root, load_json, sample_key, xywh_to_xyxy)
from stages.schema import Phrase, Sample

__all__ = ["MdetrReaderConfig", "MdetrImage", "PhraseTarget", "MdetrGroundingReader"]


@dataclass
class MdetrReaderConfig:
    annotations: str = ""                  # path or fsspec URL of the MDETR JSON (.json or .json.gz)
    image_root: str = ""                   # folder or URL prefix for images without a mapped data_source
    image_roots: dict[str, str] = field(default_factory=dict)   # data_source -> root (mixed: coco, vg)
    source: str = ""                       # Sample.source / input_shard; "" -> the JSON file's stem
    box_convention: BoxConvention = BoxConvention.LEGACY
    keep_images_without_boxes: bool = True
    check_image_root: bool = True          # fail at start when an image root is not a folder
    storage_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.annotations:
            raise ValueError("annotations is empty: give the path or URL of the MDETR JSON")
        if not self.image_root and not self.image_roots:
            raise ValueError("image_root is empty: give the folder (or URL prefix) holding the images, "
                             "or image_roots {data_source: folder} for a mixed file")


@dataclass
class MdetrImage:
    index: int
    image_id: int | str
    file_name: str
    image_root: str
    caption: str
    width: int | None
    height: int | None
    boxes: list[list[float]]                       # xyxy training targets
    tokens_positive: list[list[list[int]]]         # per box, its [start, end) spans
    meta: dict[str, Any]                           # data_source, dataset_name, eval fields if present

    @property
    def phrases(self) -> list[Phrase]:
        spans = sorted({(s, e) for box_spans in self.tokens_positive for s, e in box_spans})
        return [Phrase(text=self.caption[s:e], span=(s, e)) for s, e in spans]


@dataclass
class PhraseTarget:
    """The ground truth of one evaluation phrase (Flickr30k entities protocol)."""
    key: tuple[Any, int]                           # (image_id, phrase index in tokens_positive_eval)
    image_id: int | str
    original_img_id: Any
    sentence_id: Any
    spans: list[list[int]]
    text: str
    boxes: list[list[float]]                       # xyxy, x2 = x + w (the XML corners)


_EVAL_FIELDS = ("sentence_id", "original_img_id", "tokens_positive_eval", "dataset_name", "data_source")


class MdetrGroundingReader(ImageSamples):
    def __init__(self, config: MdetrReaderConfig) -> None:
        config.validate()
        self.config = config
        self.path = str(config.annotations)
        self.source = config.source or file_stem(self.path)
        self.convention = BoxConvention(config.box_convention)
        self._build(load_json(self.path, config.storage_options))
        if config.check_image_root:
            roots = {config.image_roots.get(m.get("data_source"), config.image_root) for m in self._meta}
            for root in sorted(roots):
                key = next((f"image_roots.{k}" for k, v in config.image_roots.items() if v == root),
                           "image_root")
                check_root(root, key, config.storage_options)

    def _build(self, data: Any) -> None:
        path = self.path
        if not isinstance(data, dict) or "images" not in data:
            raise fail(path, "images", "missing", "an MDETR file is an object with 'images' and "
                       "'annotations' lists")
        images = as_list(data["images"], path, "images", "write images as a list of objects")
        annotations = as_list(data.get("annotations", []), path, "annotations",
                              "write annotations as a list of objects")
        image_pos: dict[Any, int] = {}
        self._ids, self._files, self._captions, self._sizes, self._meta = [], [], [], [], []
        for i, img in enumerate(images):
            img = as_dict(img, path, f"images[{i}]")
            iid = as_id(img.get("id"), path, f"images[{i}].id")
            if iid in image_pos:
                raise fail(path, f"images[{i}].id", f"image id {iid!r} is used again "
                           f"(first at images[{image_pos[iid]}])", "give every caption entry a unique id")
            image_pos[iid] = i
            caption = img.get("caption")
            if not isinstance(caption, str):
                raise fail(path, f"images[{i}].caption", f"expected a string, got {caption!r:.60}",
                           "every MDETR image entry carries the caption its spans refer to")
            name = img.get("file_name")
            if not isinstance(name, str) or not name.strip():
                raise fail(path, f"images[{i}].file_name", f"expected a non-empty string, got {name!r}",
                           "give every image its file_name relative to the image root")
            sizes = []
            for key in ("width", "height"):
                value = None if img.get(key) is None else as_int_like(img[key], path, f"images[{i}].{key}")
                if value is not None and value <= 0:
                    raise fail(path, f"images[{i}].{key}", f"must be positive, got {value}",
                               "write the image's size in pixels or drop the field")
                sizes.append(value)
            meta = {k: img[k] for k in _EVAL_FIELDS if k in img}
            if "tokens_positive_eval" in meta:
                phrases = as_list(meta["tokens_positive_eval"], path, f"images[{i}].tokens_positive_eval",
                                  "write one list of [start, end] spans per phrase")
                meta["tokens_positive_eval"] = [
                    [as_span(sp, len(caption), path, f"images[{i}].tokens_positive_eval[{j}][{m}]")
                     for m, sp in enumerate(as_list(spans, path, f"images[{i}].tokens_positive_eval[{j}]",
                                                    "write the phrase as a list of [start, end] spans"))]
                    for j, spans in enumerate(phrases)]
            source = meta.get("data_source")
            if source is not None and source not in self.config.image_roots and not self.config.image_root:
                raise fail(path, f"images[{i}].data_source", f"{source!r} has no folder in image_roots",
                           f"add image_roots.{source}=FOLDER (or set image_root)")
            self._ids.append(iid)
            self._files.append(name)
            self._captions.append(caption)
            self._sizes.append(tuple(sizes))
            self._meta.append(meta)

        n = len(annotations)
        pos = np.empty(n, dtype=np.int64)
        xywh = np.empty((n, 4), dtype=np.float64)
        crowd = np.zeros(n, dtype=bool)
        spans_of: list[list[list[int]]] = []
        for k, ann in enumerate(annotations):
            ann = as_dict(ann, path, f"annotations[{k}]")
            iid = ann.get("image_id")
            try:
                pos[k] = image_pos[iid]
            except (KeyError, TypeError):
                raise fail(path, f"annotations[{k}].image_id", f"annotation {k} refers to image_id "
                           f"{iid!r} that is not in images", "add the image to 'images' or remove the "
                           "annotation") from None
            if "bbox" not in ann:
                raise fail(path, f"annotations[{k}].bbox", "missing", "every box annotation needs [x, y, w, h]")
            xywh[k] = as_box(ann["bbox"], path, f"annotations[{k}].bbox")
            if "tokens_positive" not in ann:
                raise fail(path, f"annotations[{k}].tokens_positive", "missing",
                           "a grounding box needs the caption spans it grounds, as [[start, end], ...]")
            caption_len = len(self._captions[pos[k]])
            spans = as_list(ann["tokens_positive"], path, f"annotations[{k}].tokens_positive",
                            "write the spans as [[start, end], ...]")
            spans_of.append([as_span(sp, caption_len, path, f"annotations[{k}].tokens_positive[{m}]")
                             for m, sp in enumerate(spans)])
            iscrowd = ann.get("iscrowd", 0)
            if iscrowd not in (0, 1):
                raise fail(path, f"annotations[{k}].iscrowd", f"expected 0 or 1, got {iscrowd!r}",
                           "set iscrowd to 0 or 1")
            crowd[k] = bool(iscrowd)

        order = np.argsort(pos, kind="stable")
        pos, crowd = pos[order], crowd[order]
        self._xywh = xywh[order]
        self._spans = [spans_of[o] for o in order]
        sizes = np.array([[np.nan if v is None else v for v in s] for s in self._sizes],
                         dtype=np.float64).reshape(-1, 2)
        self._xyxy, keep = convert_boxes(self._xywh, sizes[pos, 0], sizes[pos, 1], self.convention)
        self._target = keep & ~crowd
        self._crowd = crowd
        self._outside = ~keep & ~crowd          # wholly outside the image (or empty): not a target
        self._clipped = clipped_mask(self._xywh, self._xyxy, self.convention) & self._target
        self._offsets = np.concatenate([[0], np.cumsum(np.bincount(pos, minlength=len(images)))])
        targets = np.bincount(pos[self._target], minlength=len(images))
        self._order = [i for i in range(len(images))
                       if self.config.keep_images_without_boxes or targets[i] > 0]
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

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, index: int) -> MdetrImage:
        i = self._order[index]
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        target = self._target[start:end]
        meta = self._meta[i]
        return MdetrImage(
            index=index, image_id=self._ids[i], file_name=self._files[i],
            image_root=self.config.image_roots.get(meta.get("data_source"), self.config.image_root),
            caption=self._captions[i], width=self._sizes[i][0], height=self._sizes[i][1],
            boxes=self._xyxy[start:end][target].tolist(),
            tokens_positive=[[list(sp) for sp in s] for s, t in zip(self._spans[start:end], target) if t],
            meta=dict(meta))

    def __iter__(self) -> Iterator[MdetrImage]:
        for index in range(len(self)):
            yield self[index]

    def image_url(self, image: MdetrImage) -> str:
        return join_root(image.image_root, image.file_name)

    def to_sample(self, image: MdetrImage, image_bytes: bytes | None = None) -> Sample:
        return Sample(
            key=sample_key(image.image_id), input_shard=self.source, source=self.source,
            image=image_bytes, image_ext=image_ext(posixpath.basename(image.file_name)),
            caption=image.caption, width=image.width, height=image.height,
            phrases=image.phrases, boxes=image.boxes, tokens_positive=image.tokens_positive,
            meta={"image_id": image.image_id, "file_name": image.file_name, **image.meta})

    def grounding_targets(self) -> list[PhraseTarget]:
        """Per evaluation phrase (images with ``tokens_positive_eval``), its ground-truth boxes."""
        targets = []
        for i, meta in enumerate(self._meta):
            phrases = meta.get("tokens_positive_eval")
            if phrases is None:
                continue
            start, end = int(self._offsets[i]), int(self._offsets[i + 1])
            caption = self._captions[i]
            for j, phrase_spans in enumerate(phrases):
                wanted = {tuple(sp) for sp in phrase_spans}
                boxes = [xywh_to_xyxy(self._xywh[a], BoxConvention.CONTINUOUS)
                         for a in range(start, end)
                         if not self._crowd[a] and wanted & {tuple(sp) for sp in self._spans[a]}]
                if not boxes:
                    raise fail(self.path, f"images[{i}].tokens_positive_eval[{j}]",
                               f"no annotation of image {self._ids[i]!r} has the span(s) "
                               f"{sorted(wanted)} in its tokens_positive",
                               "list only phrases that have boxes (MDETR's conversion keeps those only)")
                targets.append(PhraseTarget(
                    key=(self._ids[i], j), image_id=self._ids[i],
                    original_img_id=meta.get("original_img_id"), sentence_id=meta.get("sentence_id"),
                    spans=[list(sp) for sp in phrase_spans],
                    text=" ".join(caption[s:e] for s, e in phrase_spans), boxes=boxes))
        return targets
