"""Export output shards for other trainers: ODVG jsonl and MDETR-style COCO JSON.

``export_shards(shards, out_dir, format="odvg"|"mdetr", min_score=None, ...) -> summary dict``
(``export_samples`` takes the samples themselves). The result is self-contained::

    OUT/images/KEY.jpg     the original image bytes (never re-encoded; .png/.webp keep theirs)
    OUT/odvg.jsonl         format "odvg": one JSON line per image
    OUT/mdetr.json         format "mdetr": one COCO-style JSON object

File names in the annotation file are relative to ``OUT`` (``images/KEY.jpg``), so the image
root is ``OUT`` itself: mm-grounding-dino ``ODVGDataset(data_root=OUT, ann_file="odvg.jsonl",
data_prefix=dict(img=""))``, Open-GroundingDino ``{"root": OUT, "anno": OUT/odvg.jsonl,
"dataset_mode": "odvg"}``, MDETR/GLIP ``img_folder=OUT, ann_file=OUT/mdetr.json``, this project
``MdetrReaderConfig(annotations=OUT/mdetr.json, image_root=OUT)``. A key seen twice (two shards of different sources) is written once as
``KEY`` and then as ``SHARD-KEY`` (``renamed`` counts them). The annotation file is written
last and whole: when it exists, the export is complete.

Box conventions. The records' ``xyxy`` boxes are read under ``box_convention`` (``legacy`` by
default: this project's teacher and readers clip to ``[0, W - 1]`` and take ``x2`` as the last
pixel, ``w = x2 - x1 + 1``; see ``stages.readers.common``), and each format gets its own:

- ODVG (Grounding-DINO, Open-GroundingDino, mm-grounding-dino ``ODVGDataset``): ``bbox`` is the
  exact corner box ``[x1, y1, x2, y2]`` (``x2 = x + w``, what mmdet's ``coco2odvg``/``goldg2odvg``
  write), clipped to ``[0, W] x [0, H]``. A line::

      {"filename": "images/KEY.jpg", "height": H, "width": W,
       "grounding": {"caption": "...", "regions": [{"bbox": [x1, y1, x2, y2], "phrase": "a dog",
                                                    "tokens_positive": [[2, 7]], "score": 0.8}]}}

  One region per box (a flat ``bbox``; mm-grounding-dino's grouped form, a list of boxes under
  one phrase, means the same, and Open-GroundingDino reads only the flat form). ``phrase`` is
  the record's phrase text for the box's span (else the caption pieces joined by spaces);
  ``score`` is there for pseudo labels (the readers ignore extra keys).
- MDETR (MDETR, GLIP's ``ModulatedDataset``, ``stages.readers.mdetr.MdetrGroundingReader``):
  ``images[*]`` = ``{id, file_name, height, width, caption, tokens_positive_eval, key, source,
  shard}`` (ids from 1; ``tokens_positive_eval``: the span lists of the grounded phrases in
  caption order); ``annotations[*]`` = ``{id, image_id, bbox: [x, y, w, h], area: w * h,
  iscrowd: 0, category_id: 1, tokens_positive, score}`` and ``categories`` =
  ``[{id: 1, name: "object"}]``; ``info.box_convention`` names the convention used. ``w`` is
  the pixel extent (``x2 - x1 + 1`` for legacy), so ``MdetrGroundingReader`` with the same
  ``box_convention`` gives back the records' boxes exactly (boxes inside the image).

``min_score``: boxes scoring below it are left out (boxes without a score, human labels, are
kept); an image with no box left (or none to begin with) is skipped and counted.
"""
from __future__ import annotations

import enum
import json
import math
import os
import re
from typing import Any, Iterable

from core.storage import Folder
from pipeline.gallery import phrase_groups
from pipeline.storage import iter_output_samples
from stages.readers.common import BoxConvention, xyxy_to_xywh
from stages.readers.output import filter_scores
from stages.schema import IMAGE_EXTENSIONS, Sample

__all__ = ["ExportFormat", "ANNOTATION_FILES", "odvg_entry", "mdetr_entries", "export_samples",
           "export_shards"]


class ExportFormat(str, enum.Enum):
    ODVG = "odvg"
    MDETR = "mdetr"


ANNOTATION_FILES = {ExportFormat.ODVG: "odvg.jsonl", ExportFormat.MDETR: "mdetr.json"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _box_texts(record: dict) -> list[str]:
    box_group, groups = phrase_groups(record)
    return [groups[g]["text"] for g in box_group]


def _exact_corners(box: list[float], width: int, height: int,
                   convention: BoxConvention) -> list[float]:
    off = 1.0 if convention is BoxConvention.LEGACY else 0.0
    x1, y1, x2, y2 = (float(v) for v in box)
    return [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
            min(max(x2 + off, 0.0), width), min(max(y2 + off, 0.0), height)]


def odvg_entry(record: dict, filename: str,
               box_convention: BoxConvention = BoxConvention.LEGACY) -> dict[str, Any]:
    """One ODVG line (as a dict) of a checked record; see the module docstring."""
    convention = BoxConvention(box_convention)
    scores = record.get("scores")
    regions = []
    for i, (box, spans, text) in enumerate(zip(record["boxes"], record["tokens_positive"],
                                               _box_texts(record))):
        region: dict[str, Any] = {
            "bbox": _exact_corners(box, record["width"], record["height"], convention),
            "phrase": text,
            "tokens_positive": [[int(s), int(e)] for s, e in spans],
        }
        if scores is not None:
            region["score"] = float(scores[i])
        regions.append(region)
    return {"filename": filename, "height": record["height"], "width": record["width"],
            "grounding": {"caption": record["caption"], "regions": regions}}


def mdetr_entries(record: dict, filename: str, image_id: int, first_annotation_id: int,
                  box_convention: BoxConvention = BoxConvention.LEGACY, shard: str = ""
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``images`` entry and the ``annotations`` of one checked record."""
    convention = BoxConvention(box_convention)
    box_group, groups = phrase_groups(record)
    grounded = sorted({tuple(tuple(s) for s in spans) for spans in record["tokens_positive"]})
    image = {"id": image_id, "file_name": filename, "height": record["height"],
             "width": record["width"], "caption": record["caption"],
             "tokens_positive_eval": [[list(s) for s in spans] for spans in grounded],
             "key": record.get("key", ""), "source": record.get("source", ""), "shard": shard}
    scores = record.get("scores")
    annotations = []
    for i, (box, spans) in enumerate(zip(record["boxes"], record["tokens_positive"])):
        x, y, w, h = xyxy_to_xywh(box, convention)
        annotation: dict[str, Any] = {
            "id": first_annotation_id + i, "image_id": image_id, "bbox": [x, y, w, h],
            "area": w * h, "iscrowd": 0, "category_id": 1,
            "tokens_positive": [[int(s), int(e)] for s, e in spans],
            "phrase": groups[box_group[i]]["text"]}
        if scores is not None:
            annotation["score"] = float(scores[i])
        annotations.append(annotation)
    return image, annotations


def _unique_name(key: str, ext: str, shard: str, used: set[str]) -> str:
    """``images/KEY.ext``, else ``images/SHARD-KEY.ext``, else ``images/KEY-N.ext`` (the first
    free one); keys and shard names are reduced to ``[A-Za-z0-9_-]`` (no path can escape)."""
    key, shard = _UNSAFE.sub("_", key)[:90], _UNSAFE.sub("_", shard)[:40]
    candidates = [key] + ([f"{shard}-{key}"] if shard else [])
    candidates += [f"{key}-{k}" for k in range(1, len(used) + 2)]
    for stem in candidates:
        name = f"images/{stem}.{ext}"
        if name not in used:
            used.add(name)
            return name
    raise AssertionError("unreachable: len(used) + 1 candidates cannot all be taken")


def export_samples(samples: Iterable[Sample], out_dir: str | os.PathLike, *,
                   format: ExportFormat | str, min_score: float | None = None,
                   box_convention: BoxConvention | str = BoxConvention.LEGACY,
                   storage_options: dict | None = None) -> dict[str, Any]:
    """Export ``Sample`` s with their image bytes (``pipeline.storage.iter_output_samples``); see the module
    docstring. Returns ``{format, out_dir, annotations, image_root, box_convention, min_score,
    samples, images, boxes, boxes_below_min_score, skipped_no_boxes, renamed}``."""
    try:
        fmt = ExportFormat(format)
    except ValueError:
        raise ValueError(f"format: {format!r} is not an export format; use one of "
                         f"{[f.value for f in ExportFormat]}") from None
    try:
        convention = BoxConvention(box_convention)
    except ValueError:
        raise ValueError(f"box_convention: {box_convention!r} is not one of "
                         f"{[c.value for c in BoxConvention]}") from None
    if min_score is not None and (isinstance(min_score, bool) or not isinstance(
            min_score, (int, float)) or not math.isfinite(min_score)):
        raise ValueError(f"min_score: expected a number or None, got {min_score!r}")
    folder = Folder(os.fspath(out_dir), storage_options)
    used: set[str] = set()
    counts = {"samples": 0, "images": 0, "boxes": 0, "boxes_below_min_score": 0,
              "skipped_no_boxes": 0, "renamed": 0}
    name = ANNOTATION_FILES[fmt]

    def write_annotations(out) -> None:
        images: list[dict] = []
        annotations: list[dict] = []
        labelers: list[Any] = []
        for arrival, sample in enumerate(samples):
            key, shard, ext = sample.key, sample.input_shard, sample.image_ext
            where = f"{shard or 'sample'} {key or arrival}"
            if ext not in IMAGE_EXTENSIONS:
                raise ValueError(f"{where}: image_ext: {ext!r} is not one of {IMAGE_EXTENSIONS}. "
                                 "Fix: pass the extension of the image member (jpg, png, ...)")
            counts["samples"] += 1
            sample, removed = filter_scores(sample, min_score)
            counts["boxes_below_min_score"] += removed
            if not sample.boxes:
                counts["skipped_no_boxes"] += 1
                continue
            record = sample.to_record()
            filename = _unique_name(key or f"sample{arrival}", ext, shard, used)
            counts["renamed"] += filename != f"images/{key}.{ext}"
            folder.write_bytes(filename, bytes(sample.image))
            counts["images"] += 1
            counts["boxes"] += len(record["boxes"])
            if record.get("labeler") is not None and record["labeler"] not in labelers:
                labelers.append(record["labeler"])
            if fmt is ExportFormat.ODVG:
                line = odvg_entry(record, filename, convention)
                out.write(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n")
            else:
                image, anns = mdetr_entries(record, filename, len(images) + 1,
                                            len(annotations) + 1, convention, shard)
                images.append(image)
                annotations.extend(anns)
        if fmt is ExportFormat.MDETR:
            info = {"description": "exported from glip-selftrain output shards "
                                   "(pipeline.export)",
                    "box_convention": convention.value, "min_score": min_score,
                    "image_root": "the folder of this file", "labelers": labelers}
            json.dump({"info": info, "images": images, "annotations": annotations,
                       "categories": [{"id": 1, "name": "object", "supercategory": "object"}]},
                      out, ensure_ascii=False, allow_nan=False)

    folder.write_text_with(name, write_annotations)
    return {"format": fmt.value, "out_dir": folder.url, "annotations": folder.path(name),
            "image_root": folder.root, "box_convention": convention.value,
            "min_score": min_score, **counts}


def export_shards(shards: str | Iterable[str], out_dir: str | os.PathLike, *,
                  format: ExportFormat | str, storage_options: dict | None = None,
                  **options: Any) -> dict[str, Any]:
    """``export_samples`` over output shards (paths or fsspec URLs); ``options`` are
    ``min_score`` and ``box_convention``. ``storage_options`` serve the shards and ``out_dir``."""
    return export_samples(iter_output_samples(shards, storage_options), out_dir, format=format,
                          storage_options=storage_options, **options)
