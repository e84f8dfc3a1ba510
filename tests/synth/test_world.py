"""The miniature world (``synth.world``): determinism, readers, rare classes, captions, counts."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.config import ConfigError, load
from evaluation.detection import coco_detection_metrics, phrase_grounding_recall
from stages.ingest import Ingest
from stages.readers import (CocoDetectionReader, CocoReaderConfig, MdetrGroundingReader,
                            MdetrReaderConfig, xywh_to_xyxy)
from stages.readers.common import BoxConvention
from stages.shards import read_shard
from synth.config import WorldConfig
from synth.world import build_world, ensure_world, load_world
from synth.draw import MASK_THRESHOLD, render_object
from synth.shapes import SHAPES

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "world"


def small_config() -> WorldConfig:
    return load(WorldConfig, CONFIGS / "test.yaml")




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world") / "w", small_config())


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _coco(world, split: str) -> CocoDetectionReader:
    return CocoDetectionReader(CocoReaderConfig(annotations=str(world.path(f"{split}/annotations.json")),
                                                image_root=str(world.images(split))))


def _mdetr(world, rel: str, split: str) -> MdetrGroundingReader:
    return MdetrGroundingReader(MdetrReaderConfig(annotations=str(world.path(rel)),
                                                  image_root=str(world.images(split))))


def _web(world) -> list:
    samples = []
    for tar in world.web_shards:
        with open(tar, "rb") as fh:
            contents = read_shard(fh, tar.stem, source="world_web")
        assert contents.error is None
        samples += contents.samples
    return samples


def test_configs_load_and_bad_values_are_refused():
    default = load(WorldConfig, CONFIGS / "default.yaml")
    assert set(default.rare_classes).isdisjoint(default.common_classes)
    assert default.web_images > default.detection_images > default.grounding_images
    small = small_config()
    assert small.web_images < default.web_images and small.classes == default.classes
    for bad in (["rare_classes=[moon, star]"], ["common_classes=[circle, dragon]"],
                ["rare_in_grounding=5"], ["image_size=[200, 100]"], ["colours=[red, mauve]"],
                ["web_rare_fraction=1.5"], ["objects_per_image=[1, 12]"]):
        with pytest.raises(ConfigError):
            load(WorldConfig, CONFIGS / "test.yaml", bad)


def test_same_config_builds_byte_identical_files(world, tmp_path):
    again = build_world(tmp_path / "again", small_config())
    first, second = _tree(world.root), _tree(again.root)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []
    other = build_world(tmp_path / "seed1", load(WorldConfig, CONFIGS / "test.yaml", ["seed=1"]))
    changed = _tree(other.root)
    assert changed["detection/annotations.json"] != first["detection/annotations.json"]
    assert changed["web/00000.tar"] != first["web/00000.tar"]


def test_every_split_reads_back_with_the_project_readers(world):
    cfg = world.config
    det, ev = _coco(world, "detection"), _coco(world, "eval")
    gro = _mdetr(world, "grounding/annotations.json", "grounding")
    ev_g = _mdetr(world, "eval/grounding.json", "eval")
    for reader, n in ((det, cfg.detection_images), (ev, cfg.eval_images), (gro, cfg.grounding_images),
                      (ev_g, cfg.eval_images)):
        assert len(reader) == n
        assert reader.stats["degenerate_boxes"] == 0 and reader.stats["crowd_boxes"] == 0
        assert reader.stats["images_without_boxes"] == 0
        for sample in reader.samples():
            assert sample.kept and sample.boxes
            with Image.open(io.BytesIO(sample.image)) as img:
                assert img.format == "JPEG" and img.size == (sample.width, sample.height)
    assert det.category_names == cfg.common_classes
    assert ev.category_names == cfg.classes
    assert {ev.categories[c]: f for c, f in ev.category_frequency.items() if f == "r"} == {
        name: "r" for name in cfg.rare_classes}
    for reader in (gro, ev_g):
        for sample in reader.samples(read_images=False):
            assert len(sample.phrases) == len(sample.boxes)       # one phrase per object
            for phrase in sample.phrases:
                assert sample.caption[phrase.span[0]:phrase.span[1]] == phrase.text
    assert len(gro.grounding_targets()) == world.counts["grounding"]["phrases"]

    web = _web(world)
    assert len(web) == cfg.web_images
    Ingest()(web)
    assert all(s.kept for s in web), [(s.key, s.drop_reason) for s in web if not s.kept]
    truth = {t["key"]: t for t in json.loads(world.path("web_truth.json").read_text())["samples"]}
    for s in web:
        assert s.caption == truth[s.key]["caption"] == s.meta["caption"]
        assert (s.width, s.height) == (truth[s.key]["width"], truth[s.key]["height"])
        assert not s.boxes and "boxes" not in s.meta and "objects" not in s.meta    # no labels on the web


def test_rare_classes_never_in_detection_and_rare_in_grounding(world):
    cfg = world.config
    det = json.loads(world.detection_annotations.read_text())
    ids = {c["name"]: c["id"] for c in json.loads(world.eval_annotations.read_text())["categories"]}
    assert {c["name"] for c in det["categories"]} == set(cfg.common_classes)
    assert not {ids[r] for r in cfg.rare_classes} & {a["category_id"] for a in det["annotations"]}

    gro = json.loads(world.grounding_annotations.read_text())
    per_class = Counter(a["category_id"] for a in gro["annotations"])
    images = {r: {a["image_id"] for a in gro["annotations"] if a["category_id"] == ids[r]}
              for r in cfg.rare_classes}
    for rare in cfg.rare_classes:
        assert per_class[ids[rare]] == len(images[rare]) == cfg.rare_in_grounding
        assert any(rare in img["caption"] for img in gro["images"] if img["id"] in images[rare])
    in_training = Counter(a["category_id"] for a in det["annotations"]) + per_class
    assert min(in_training[ids[c]] for c in cfg.common_classes) > cfg.rare_in_grounding

    web = world.counts["web"]["per_class"]
    ev = world.counts["eval"]["per_class"]
    for rare in cfg.rare_classes:
        assert web[rare]["mentioned"] >= 3 * cfg.rare_in_grounding      # the web teaches them
        assert ev[rare]["instances"] > 0                                # and the eval set tests them


def test_web_noun_phrases_cover_the_objects_of_the_image(world, noun_phrase_stage):
    web = _web(world)
    Ingest()(web)
    noun_phrase_stage(web)
    truth = {t["key"]: t for t in json.loads(world.path("web_truth.json").read_text())["samples"]}
    covered, mentioned, unmentioned = 0, 0, 0
    for s in web:
        spans = {tuple(p.span) for p in s.phrases}
        objects = truth[s.key]["objects"]
        said = [o for o in objects if o["mentioned"]]
        assert said, s.key                                  # every caption names an object
        mentioned += len(said)
        unmentioned += len(objects) - len(said)
        for o in said:
            assert o["name"] in s.caption[o["span"][0]:o["span"][1]]
        covered += all(tuple(o["span"]) in spans for o in said)
    assert covered >= 0.95 * len(web), f"only {covered} of {len(web)} captions have every object as a phrase"
    assert unmentioned < 0.25 * mentioned


def test_boxes_are_tight_integers_inside_their_images(world):
    for rel in ("detection/annotations.json", "grounding/annotations.json", "eval/annotations.json",
                "eval/grounding.json"):
        data = json.loads(world.path(rel).read_text())
        size = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            width, height = size[a["image_id"]]
            assert all(isinstance(v, int) for v in a["bbox"]) and w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= width and y + h <= height, (rel, a)
    for sample in json.loads(world.path("web_truth.json").read_text())["samples"]:
        for o in sample["objects"]:
            x, y, w, h = o["bbox"]
            assert x >= 0 and y >= 0 and x + w <= sample["width"] and y + h <= sample["height"]
    # the legacy corners are the object's first and last pixels: no clipping moved a box
    det = _coco(world, "detection")
    raw = json.loads(world.detection_annotations.read_text())["annotations"]
    boxes = [b for img in det for b in img.boxes]
    assert boxes == [xywh_to_xyxy(a["bbox"], BoxConvention.LEGACY) for a in raw]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_sprite_box_is_tight(shape):
    import random

    for seed in range(3):
        rng = random.Random(seed)
        sprite = render_object(rng, shape, rng.randint(24, 96), "red", ("solid", "striped", "dotted")[seed],
                               outline=bool(seed % 2))
        inside = np.asarray(sprite.mask) >= MASK_THRESHOLD
        assert inside.shape == (sprite.height, sprite.width)
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert 0.2 < inside.mean() < (1.0001 if shape == "square" else 0.95)   # a shape, not a speck


def test_counts_and_checksums_match_world_json(world, tmp_path):
    assert world.verify() == []
    data = json.loads(world.path("world.json").read_text())
    assert data == world.data and data["seed"] == world.config.seed
    ids = data["classes"]["category_ids"]
    name_of = {v: k for k, v in ids.items()}
    for split, rel in (("detection", "detection/annotations.json"), ("grounding", "grounding/annotations.json"),
                       ("eval", "eval/annotations.json")):
        ann = json.loads(world.path(rel).read_text())
        counts = data["splits"][split]
        assert counts["images"] == len(ann["images"]) == len(list(world.images(split).iterdir()))
        assert counts["boxes"] == len(ann["annotations"])
        inst = Counter(name_of[a["category_id"]] for a in ann["annotations"])
        imgs = Counter(name for name, _ in {(name_of[a["category_id"]], a["image_id"]) for a in ann["annotations"]})
        for name, c in counts["per_class"].items():
            assert (c["instances"], c["images"]) == (inst[name], imgs[name]), (split, name)
    members = Counter()
    for tar in world.web_shards:
        with tarfile.open(tar) as t:
            members.update(m.name.rsplit(".", 1)[1] for m in t.getmembers())
    web = data["splits"]["web"]
    assert members == {"jpg": web["images"], "txt": web["images"], "json": web["images"]}
    assert web["shards"] == len(world.web_shards) == 2
    truth = json.loads(world.path("web_truth.json").read_text())["samples"]
    assert web["objects"] == sum(len(t["objects"]) for t in truth)
    assert web["mentioned_objects"] == sum(o["mentioned"] for t in truth for o in t["objects"])

    # the manifest notices a changed file
    copy = build_world(tmp_path / "copy", world.config)
    copy.path("eval/annotations.json").write_text("{}")
    (copy.images("detection") / "000000.jpg").write_bytes(b"x")
    assert set(load_world(copy.root).verify()) == {"eval/annotations.json", "detection/images"}


def test_eval_split_scores_ap_per_frequency_and_grounding_recall(world):
    gt = json.loads(world.eval_annotations.read_text())
    rare = {c["id"] for c in gt["categories"] if c["frequency"] == "r"}
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    m = coco_detection_metrics(str(world.eval_annotations), perfect)
    assert m["AP"] == pytest.approx(1.0) and m["APr"] == pytest.approx(1.0)
    m = coco_detection_metrics(str(world.eval_annotations), [d for d in perfect if d["category_id"] not in rare])
    assert m["APr"] == pytest.approx(0.0) and m["APc"] == pytest.approx(1.0)

    targets = _mdetr(world, "eval/grounding.json", "eval").grounding_targets()
    assert len(targets) == world.counts["eval"]["boxes"]
    r = phrase_grounding_recall({t.key: t.boxes for t in targets}, {t.key: t.boxes for t in targets})
    assert r["R@1"] == 1.0


def test_ensure_world_reuses_an_intact_world_and_rebuilds_otherwise(world, tmp_path):
    cfg = small_config()
    out = tmp_path / "w"
    built, fresh = ensure_world(out, cfg)
    assert fresh
    again, fresh = ensure_world(out, cfg)
    assert not fresh and again.data == built.data
    (out / "web" / "00000.tar").write_bytes(b"broken")
    _, fresh = ensure_world(out, cfg)
    assert fresh and load_world(out).verify() == []
    _, fresh = ensure_world(out, load(WorldConfig, CONFIGS / "test.yaml", ["seed=3"]))
    assert fresh and load_world(out).config.seed == 3

    with pytest.raises(FileExistsError):
        build_world(out, cfg)                             # no silent overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_world(foreign, cfg, overwrite=True)         # never deletes what is not a world
    assert (foreign / "notes.txt").read_text() == "mine"
