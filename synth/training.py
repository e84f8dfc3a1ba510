"""A seeded miniature of the student's training mixture, in every format the trainer reads.

``write_training_mixture(root, seed=0)`` writes, under ``root`` (a local folder):

- ``coco/instances.json`` + ``coco/images/*.jpg``: COCO-format detection (an Objects365
  stand-in) over a vocabulary of coloured shapes ("red square", "blue circle", ...);
- ``mdetr/final_mixed_train.json`` + ``mdetr/images/*.jpg``: MDETR-format grounding (a GoldG
  stand-in): one caption per image naming its shapes, each box with its ``tokens_positive``;
- ``pseudo/0000{0,1}.tar``: pseudo-labelled output shards written by ``stages.write.encode_shard``
  (the teacher stage's format: boxes with ``scores`` and a ``labeler``), some boxes scoring below
  0.5 and one sample whose every box does (so ``min_score`` screening has work to do).

The pictures hold the shapes their labels name, at the labelled places (boxes use the official
legacy convention: an ``[x, y, w, h]`` box covers pixels ``x .. x + w - 1``), so a model trained
on them can learn something in a few steps. Returns the paths as a ``TrainingMixture``. Used by
the trainer's tests and as demo data for ``configs/train/tiny_mixture.yaml``.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from stages.schema import Phrase, Sample
from stages.write import encode_shard

__all__ = ["TrainingMixture", "VOCABULARY", "write_training_mixture"]

_COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60),
            "yellow": (235, 210, 30)}
_SHAPES = ("square", "circle", "triangle")
VOCABULARY = [f"{c} {s}" for c in _COLOURS for s in _SHAPES]      # 12 category names


@dataclass(frozen=True)
class TrainingMixture:
    root: Path
    coco_annotations: Path
    coco_images: Path
    mdetr_annotations: Path
    mdetr_images: Path
    pseudo_shards: list[Path]


def _objects(rng: random.Random, size: tuple[int, int], n: int) -> list[tuple[str, list[float]]]:
    """``n`` (name, xywh) shapes inside an image of ``size`` (w, h), 28-60 px, few overlaps."""
    w, h = size
    out = []
    for _ in range(n):
        side = rng.randint(28, min(60, w - 2, h - 2))
        x, y = rng.randint(0, w - side - 1), rng.randint(0, h - side - 1)
        out.append((rng.choice(VOCABULARY), [float(x), float(y), float(side), float(side)]))
    return out


def _draw(objects, size, rng: random.Random) -> bytes:
    grey = rng.randint(90, 160)
    image = Image.new("RGB", size, (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    for name, (x, y, bw, bh) in objects:
        colour, shape = name.split()
        x2, y2 = x + bw - 1, y + bh - 1
        if shape == "square":
            pen.rectangle([x, y, x2, y2], fill=_COLOURS[colour])
        elif shape == "circle":
            pen.ellipse([x, y, x2, y2], fill=_COLOURS[colour])
        else:
            pen.polygon([((x + x2) / 2, y), (x2, y2), (x, y2)], fill=_COLOURS[colour])
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _size(rng: random.Random) -> tuple[int, int]:
    return rng.randint(120, 168), rng.randint(104, 136)


def _caption(objects) -> tuple[str, list[list[list[int]]]]:
    """"a red square, a blue circle and a green triangle" + per object its span."""
    spans, caption = [], ""
    for i, (name, _) in enumerate(objects):
        if i:
            caption += " and " if i == len(objects) - 1 else ", "
        start = len(caption) + 2                       # after "a "
        caption += f"a {name}"
        spans.append([[start, start + len(name)]])
    return caption, spans


def _xyxy(box: list[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w - 1, y + h - 1]


def write_training_mixture(root: str | Path, n_coco: int = 16, n_mdetr: int = 16,
                           n_pseudo: int = 16, seed: int = 0) -> TrainingMixture:
    """Write the three sources under ``root``; the same arguments write the same bytes."""
    root = Path(root)
    rng = random.Random(f"training-mixture-{seed}")
    cat_ids = {name: i + 1 for i, name in enumerate(VOCABULARY)}

    coco_dir, mdetr_dir, pseudo_dir = root / "coco", root / "mdetr", root / "pseudo"
    for d in (coco_dir / "images", mdetr_dir / "images", pseudo_dir):
        d.mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    for i in range(n_coco):
        size = _size(rng)
        objects = _objects(rng, size, rng.randint(1, 3))
        name = f"{i:06d}.jpg"
        (coco_dir / "images" / name).write_bytes(_draw(objects, size, rng))
        images.append({"id": i + 1, "file_name": name, "width": size[0], "height": size[1]})
        for label, box in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat_ids[label],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    coco_json = coco_dir / "instances.json"
    coco_json.write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": cid, "name": name} for name, cid in cat_ids.items()]}))

    images, annotations = [], []
    for i in range(n_mdetr):
        size = _size(rng)
        objects = _objects(rng, size, rng.randint(1, 3))
        caption, spans = _caption(objects)
        name = f"g{i:05d}.jpg"
        (mdetr_dir / "images" / name).write_bytes(_draw(objects, size, rng))
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1], "caption": caption,
                       "data_source": "vg", "dataset_name": "mixed"})
        for (_, box), span in zip(objects, spans):
            annotations.append({"id": len(annotations), "image_id": i, "bbox": box, "area": box[2] * box[3],
                                "iscrowd": 0, "category_id": 1, "tokens_positive": span})
    mdetr_json = mdetr_dir / "final_mixed_train.json"
    mdetr_json.write_text(json.dumps({"images": images, "annotations": annotations,
                                      "categories": [{"id": 1, "name": "object"}]}))

    labeler = {"model": "tiny", "checkpoint_sha256": "0" * 64, "config_sha256": "0" * 64, "min_score": 0.2}
    shards: list[Path] = []
    per_shard = max(1, (n_pseudo + 1) // 2)
    samples: list[Sample] = []
    for i in range(n_pseudo):
        size = _size(rng)
        objects = _objects(rng, size, rng.randint(1, 3))
        caption, spans = _caption(objects)
        if i == 1:
            scores = [0.3] * len(objects)             # every box below 0.5: screened away
        else:
            scores = [round(rng.uniform(0.55, 0.95), 3) for _ in objects]
            if len(objects) > 1:
                scores[-1] = 0.35                     # one low box
        samples.append(Sample(
            key=f"cc{i:05d}", input_shard=f"{i // per_shard:05d}", source="cc3m",
            image=_draw(objects, size, rng), image_ext="jpg", caption=caption,
            width=size[0], height=size[1],
            phrases=[Phrase(caption[s[0][0]:s[0][1]], (s[0][0], s[0][1])) for s in spans],
            boxes=[_xyxy(box) for _, box in objects], tokens_positive=spans, scores=scores,
            labeler=dict(labeler)))
    for start in range(0, n_pseudo, per_shard):
        path = pseudo_dir / f"{start // per_shard:05d}.tar"
        path.write_bytes(encode_shard(samples[start:start + per_shard]))
        shards.append(path)

    return TrainingMixture(root=root, coco_annotations=coco_json, coco_images=coco_dir / "images",
                           mdetr_annotations=mdetr_json, mdetr_images=mdetr_dir / "images",
                           pseudo_shards=shards)
