"""The miniature world: a seeded, self-built stand-in for O365, GoldG, CC3M and a held-out set.

No one can download the real data sets here, so the self-training demo  learns a small
world that this module draws: images of simple but distinct objects (coloured shapes and a few
object-like drawings, ``synth.draw``) on varied backgrounds, 1-4 objects per image.
``build_world(out_dir, cfg)`` writes, under ``out_dir`` (a local folder owned by the world):

- ``detection/annotations.json`` + ``detection/images/``: COCO detection, the **common** classes
  only, every object annotated (the Objects365 role);
- ``grounding/annotations.json`` + ``grounding/images/``: MDETR grounding (the GoldG role):
  ``images[*].caption``, per box ``tokens_positive``, per image ``tokens_positive_eval`` (so
  grounding recall can be computed). Mostly common classes; every **rare** class appears in
  exactly ``rare_in_grounding`` images (one instance each), nowhere else in training data;
- ``eval/annotations.json`` + ``eval/images/``: held-out COCO detection with **all** classes;
  categories carry LVIS ``frequency`` (``r`` for the rare classes; ``f`` for a common class in
  more than 100 training images, else ``c``), so ``evaluation.detection`` reports APr/APc/APf.
  ``eval/grounding.json``: the same images in MDETR format (captions naming every object);
- ``web/00000.tar`` ...: img2dataset shards (``KEY.jpg``, ``KEY.txt``, ``KEY.json``; keys
  ``SSSSSIIII``), captions only, no boxes (the CC3M role). Rare classes are frequent here
  (``web_rare_fraction``); a caption may leave an object out (``web_unmentioned_prob``) or its
  colour unsaid, as alt-text does;
- ``web_truth.json``: the true boxes of the web images, for analysis only (the pipeline never
  reads it);
- ``world.json``: the manifest (``WorldManifest``): config, seed, box convention, counts per
  split and class, sha256 of every annotation file and tar and a digest of each image folder.

Captions (``synth.captions``) are natural sentences whose noun phrases spaCy's noun chunks find, e.g. ``"a small
striped red star next to a blue circle on a checkered background"``; spatial words (``above``,
``below``) are true of the picture, size words (``small``, ``big``) of the object. The
backdrop is named ``background`` (block-listed by ``stages.noun_phrases``) or, with
``scene_phrase_prob``, ``wall``/``floor``/``curtain``: a noun phrase with no box, as real
captions have.

Boxes: COCO ``[x, y, w, h]`` in pixels with integer values, tight around the drawn object's
mask; the object covers pixels ``x .. x + w - 1`` (the readers' ``legacy`` convention,
``stages.readers.common``: ``x2 = x + w - 1``).

Deterministic: every image is drawn from ``random.Random`` seeded by (seed, split, index); JPEG
quality, tar headers and JSON layout are fixed, so the same config writes byte-identical files.
``pipeline world CONFIG OUT [key=value ...]`` builds a world from the command line.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core import config as typed_config
from synth.captions import caption as _caption
from synth.config import WorldConfig
from synth.draw import Scene, draw_scene

__all__ = ["WorldConfig", "WorldManifest", "build_world", "load_world", "ensure_world",
           "BOX_CONVENTION", "FORMAT"]

FORMAT = "glip-selftrain-world/1"
BOX_CONVENTION = "legacy"        # COCO xywh; the object covers x .. x + w - 1 (stages.readers.common)
_LVIS_FREQUENT = 100             # LVIS: a class in > 100 training images is "f", 11-100 "c", <= 10 "r"


# ------------------------------------------------------------------------------- writing
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(obj: Any, indent: int | None = None) -> bytes:
    return (json.dumps(obj, indent=indent, separators=(",", ": ") if indent else (",", ":"),
                       ensure_ascii=False) + "\n").encode("utf-8")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
        len(data), 0, 0o644, 0, 0, "", "")
    tar.addfile(info, io.BytesIO(data))


class _Split:
    """Draws a split's scenes, writes its images, collects COCO/MDETR entries and counts."""

    def __init__(self, cfg: WorldConfig, root: Path, name: str) -> None:
        self.cfg, self.name, self.root = cfg, name, root
        self.cat_id = {c: i + 1 for i, c in enumerate(cfg.classes)}
        self.images: list[dict] = []
        self.coco: list[dict] = []
        self.mdetr_images: list[dict] = []
        self.mdetr: list[dict] = []
        self.instances: Counter = Counter()
        self.image_counts: Counter = Counter()
        self.digest = hashlib.sha256()

    def scene(self, index: int, pick: Callable[[random.Random, int], str], forced: list[str]) -> Scene:
        rng, cfg = random.Random(f"world-{self.cfg.seed}-{self.name}-{index}"), self.cfg
        scene = draw_scene(rng, image_size=cfg.image_size, object_size=cfg.object_size,
                           objects_per_image=cfg.objects_per_image, colours=cfg.colours,
                           max_overlap=cfg.max_overlap, clutter=cfg.clutter, jpeg_quality=cfg.jpeg_quality,
                           pick_class=pick, forced=forced)
        self.instances.update(o.name for o in scene.objects)
        self.image_counts.update({o.name for o in scene.objects})
        return scene

    def add_image(self, index: int, scene: Scene, caption_rng: random.Random | None) -> None:
        file_name = f"{index:06d}.jpg"
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        (self.root / "images" / file_name).write_bytes(scene.jpeg)
        self.digest.update(f"{file_name} {_sha256(scene.jpeg)}\n".encode())
        iid = index + 1
        entry = {"id": iid, "file_name": file_name, "width": scene.width, "height": scene.height}
        self.images.append(entry)
        for o in scene.objects:
            self.coco.append({"id": len(self.coco) + 1, "image_id": iid, "category_id": self.cat_id[o.name],
                              "bbox": list(o.bbox), "area": o.bbox[2] * o.bbox[3], "iscrowd": 0})
        if caption_rng is None:
            return
        order = list(range(len(scene.objects)))
        caption_rng.shuffle(order)
        caption, spans = _caption(caption_rng, scene, self.cfg, [scene.objects[k] for k in order], web=False)
        self.mdetr_images.append({**entry, "caption": caption, "dataset_name": f"world_{self.name}",
                                  "original_img_id": iid, "sentence_id": 0,
                                  "tokens_positive_eval": [[s] for s in sorted(spans)]})
        for k, span in zip(order, spans):
            o = scene.objects[k]
            self.mdetr.append({"id": len(self.mdetr) + 1, "image_id": iid, "category_id": self.cat_id[o.name],
                               "bbox": list(o.bbox), "area": o.bbox[2] * o.bbox[3], "iscrowd": 0,
                               "tokens_positive": [span], "phrase": caption[span[0]:span[1]]})

    def counts(self, names: list[str]) -> dict:
        return {"images": len(self.images), "boxes": sum(self.instances.values()),
                "per_class": {c: {"instances": self.instances[c], "images": self.image_counts[c]}
                              for c in names}}


def _picker(names: list[str], rare: list[str], rare_fraction: float) -> Callable[[random.Random, int], str]:
    def pick(rng: random.Random, _: int) -> str:
        if rare and rng.random() < rare_fraction:
            return rng.choice(rare)
        return rng.choice(names)
    return pick


def _categories(cfg: WorldConfig, names: list[str], frequency: dict[str, str] | None) -> list[dict]:
    out = []
    for i, c in enumerate(cfg.classes):
        if c in names:
            cat = {"id": i + 1, "name": c, "supercategory": "shape"}
            if frequency is not None:
                cat["frequency"] = frequency[c]
            out.append(cat)
    return out


def _build(root: Path, cfg: WorldConfig) -> dict:
    files: dict[str, str] = {}

    def write(rel: str, data: bytes) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = _sha256(data)

    common = _picker(cfg.common_classes, [], 0.0)
    info = {"description": "glip-selftrain miniature world", "format": FORMAT, "seed": cfg.seed}

    det = _Split(cfg, root / "detection", "detection")
    for i in range(cfg.detection_images):
        det.add_image(i, det.scene(i, common, []), None)
    write("detection/annotations.json", _json_bytes({
        "info": {**info, "split": "detection"}, "images": det.images, "annotations": det.coco,
        "categories": _categories(cfg, cfg.common_classes, None)}))

    gro = _Split(cfg, root / "grounding", "grounding")
    plan = random.Random(f"world-{cfg.seed}-grounding-plan")
    slots = plan.sample(range(cfg.grounding_images), cfg.rare_in_grounding * len(cfg.rare_classes))
    forced = {slot: [cfg.rare_classes[j // cfg.rare_in_grounding]] for j, slot in enumerate(slots)}
    for i in range(cfg.grounding_images):
        gro.add_image(i, gro.scene(i, common, forced.get(i, [])), random.Random(f"world-{cfg.seed}-gcap-{i}"))
    write("grounding/annotations.json", _json_bytes({
        "info": {**info, "split": "grounding"}, "images": gro.mdetr_images, "annotations": gro.mdetr,
        "categories": _categories(cfg, cfg.classes, None)}))

    training = det.image_counts + gro.image_counts
    frequency = {c: "r" if c in cfg.rare_classes else ("f" if training[c] > _LVIS_FREQUENT else "c")
                 for c in cfg.classes}
    ev = _Split(cfg, root / "eval", "eval")
    pick_eval = _picker(cfg.common_classes, cfg.rare_classes, cfg.eval_rare_fraction)
    for i in range(cfg.eval_images):
        ev.add_image(i, ev.scene(i, pick_eval, []), random.Random(f"world-{cfg.seed}-ecap-{i}"))
    write("eval/annotations.json", _json_bytes({
        "info": {**info, "split": "eval"}, "images": ev.images, "annotations": ev.coco,
        "categories": _categories(cfg, cfg.classes, frequency)}))
    write("eval/grounding.json", _json_bytes({
        "info": {**info, "split": "eval"}, "images": ev.mdetr_images, "annotations": ev.mdetr,
        "categories": _categories(cfg, cfg.classes, None)}))

    web = _Split(cfg, root / "web", "web")
    pick_web = _picker(cfg.common_classes, cfg.rare_classes, cfg.web_rare_fraction)
    truth, mentioned = [], Counter()
    n_shards = math.ceil(cfg.web_images / cfg.web_shard_size)
    for s in range(n_shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * cfg.web_shard_size, min(cfg.web_images, (s + 1) * cfg.web_shard_size)):
                scene = web.scene(i, pick_web, [])
                rng = random.Random(f"world-{cfg.seed}-wcap-{i}")
                order = list(range(len(scene.objects)))
                rng.shuffle(order)
                said = [k for j, k in enumerate(order) if j == 0 or rng.random() >= cfg.web_unmentioned_prob]
                caption, spans = _caption(rng, scene, cfg, [scene.objects[k] for k in said], web=True)
                span_of = dict(zip(said, spans))
                key = f"{s:05d}{i - s * cfg.web_shard_size:04d}"
                meta = {"url": f"https://web.world.invalid/{key}.jpg", "key": key, "status": "success",
                        "error_message": None, "caption": caption, "width": scene.width,
                        "height": scene.height, "original_width": scene.width,
                        "original_height": scene.height, "exif": None, "sha256": _sha256(scene.jpeg)}
                _tar_member(tar, f"{key}.jpg", scene.jpeg)
                _tar_member(tar, f"{key}.txt", caption.encode("utf-8"))
                _tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                mentioned.update(scene.objects[k].name for k in said)
                truth.append({"shard": f"{s:05d}", "key": key, "caption": caption, "width": scene.width,
                              "height": scene.height, "objects": [
                                  {"name": o.name, "category_id": web.cat_id[o.name], "colour": o.colour,
                                   "fill": o.fill, "bbox": list(o.bbox), "mentioned": k in span_of,
                                   "span": span_of.get(k)} for k, o in enumerate(scene.objects)]})
        write(f"web/{s:05d}.tar", buf.getvalue())
    write("web_truth.json", _json_bytes({
        "note": "true boxes of the web images, for analysis only; the pipeline never reads this",
        "box_convention": BOX_CONVENTION, "categories": _categories(cfg, cfg.classes, frequency),
        "samples": truth}))

    web_counts = {"images": cfg.web_images, "shards": n_shards, "objects": sum(web.instances.values()),
                  "mentioned_objects": sum(mentioned.values()),
                  "per_class": {c: {"instances": web.instances[c], "images": web.image_counts[c],
                                    "mentioned": mentioned[c]} for c in cfg.classes}}
    gro_counts = gro.counts(cfg.classes)
    gro_counts["phrases"] = len(gro.mdetr)
    return {
        "format": FORMAT, "seed": cfg.seed, "config": typed_config.to_dict(cfg),
        "box_convention": BOX_CONVENTION,
        "classes": {"common": list(cfg.common_classes), "rare": list(cfg.rare_classes),
                    "category_ids": {c: i + 1 for i, c in enumerate(cfg.classes)}, "frequency": frequency},
        "splits": {"detection": det.counts(cfg.common_classes), "grounding": gro_counts,
                   "eval": ev.counts(cfg.classes), "web": web_counts},
        "files": files,
        "image_folders": {f"{s.name}/images": s.digest.hexdigest() for s in (det, gro, ev)},
    }


# ------------------------------------------------------------------------------- manifest
@dataclass
class WorldManifest:
    """A built world: its folder and ``world.json`` (``data``)."""
    root: Path
    data: dict
    build_seconds: float | None = None   # set by build_world; not written (world.json is deterministic)

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def config(self) -> WorldConfig:
        return typed_config.from_dict(WorldConfig, self.data["config"], source=str(self.root / "world.json"))

    @property
    def detection_annotations(self) -> Path:
        return self.root / "detection" / "annotations.json"

    @property
    def grounding_annotations(self) -> Path:
        return self.root / "grounding" / "annotations.json"

    @property
    def eval_annotations(self) -> Path:
        return self.root / "eval" / "annotations.json"

    @property
    def eval_grounding(self) -> Path:
        return self.root / "eval" / "grounding.json"

    def images(self, split: str) -> Path:
        return self.root / split / "images"

    @property
    def web_shards(self) -> list[Path]:
        return [self.root / rel for rel in sorted(self.data["files"]) if rel.startswith("web/")]

    @property
    def counts(self) -> dict:
        return self.data["splits"]

    def verify(self) -> list[str]:
        """The files whose bytes differ from the manifest (empty: the world is intact)."""
        bad = [rel for rel, digest in self.data["files"].items()
               if not (self.root / rel).is_file() or _sha256((self.root / rel).read_bytes()) != digest]
        for rel, digest in self.data["image_folders"].items():
            h = hashlib.sha256()
            folder = self.root / rel
            for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
                h.update(f"{name} {_sha256((folder / name).read_bytes())}\n".encode())
            if h.hexdigest() != digest:
                bad.append(rel)
        return bad


def load_world(root: str | Path) -> WorldManifest:
    root = Path(root)
    data = json.loads((root / "world.json").read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{root / 'world.json'}: format {data.get('format')!r} is not {FORMAT!r}; rebuild it")
    return WorldManifest(root=root, data=data)


def build_world(out_dir: str | Path, cfg: WorldConfig, overwrite: bool = False) -> WorldManifest:
    """Draw and write the world under ``out_dir`` (see the module docstring).

    The world is built in a sibling temporary folder and renamed into place, so ``out_dir`` is
    either a complete world or untouched. An existing ``out_dir`` is replaced only with
    ``overwrite`` and only when it is empty or holds a world (``world.json``).
    """
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True to rebuild the world there")
        if not (out / "world.json").is_file():
            raise FileExistsError(f"{out} holds files but no world.json; not deleting it, choose another folder")
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        data = _build(tmp, cfg)
        (tmp / "world.json").write_bytes(_json_bytes(data, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return WorldManifest(root=out, data=data, build_seconds=time.perf_counter() - start)


def ensure_world(out_dir: str | Path, cfg: WorldConfig) -> tuple[WorldManifest, bool]:
    """The world of ``cfg`` at ``out_dir``: reused when its config and bytes match, else (re)built.

    Returns ``(manifest, built)``.
    """
    cfg.validate()
    out = Path(out_dir)
    if (out / "world.json").is_file():
        try:
            world = load_world(out)
        except (ValueError, OSError):
            world = None
        if world is not None and world.data.get("config") == typed_config.to_dict(cfg) and not world.verify():
            return world, False
    return build_world(out, cfg, overwrite=True), True
