"""Export: ODVG lines and MDETR JSON from output shards, read back by this project's MDETR reader."""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.export import export_samples, export_shards
from pipeline.storage import iter_output_samples
from stages.readers import BoxConvention, MdetrGroundingReader, MdetrReaderConfig
from stages.schema import Phrase, Sample
from stages.write import encode_shard

LABELER = {"model": "glip_t", "checkpoint_sha256": "ab" * 32, "config_sha256": "cd" * 32,
           "min_score": 0.3}
DOG = "a brown dog chasing a red ball on the beach"


def encode(size, fmt="JPEG", orientation=None) -> bytes:
    buf = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    Image.new("RGB", size, (90, 140, 200)).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def sample(key, caption, spans, boxes, tokens, scores=(), size=(200, 120), image=None, ext="jpg",
           shard="00000") -> Sample:
    return Sample(key=key, input_shard=shard, source="test", image=image or encode(size),
                  image_ext=ext, caption=caption, width=size[0], height=size[1],
                  phrases=[Phrase(caption[s:e], (s, e)) for s, e in spans], boxes=boxes,
                  tokens_positive=tokens, scores=list(scores),
                  labeler=LABELER if scores else None)


def shard_samples() -> dict[str, list[Sample]]:
    return {
        "00000": [
            # two boxes of one phrase, one of another; the box touching the right/bottom edge
            # is legal under the legacy convention (x2 <= W - 1)
            sample("dog", DOG, [(0, 11), (20, 30), (34, 43)],
                   [[20.5, 30, 120, 110.25], [140, 60, 199, 119], [150, 10, 170, 30]],
                   [[[0, 11]], [[20, 30]], [[20, 30]]], scores=[0.82, 0.4, 0.61]),
            sample("rotated", "a tall tower", [(0, 12)], [[10, 100, 90, 150]], [[[0, 12]]],
                   scores=[0.9], size=(100, 160), image=encode((160, 100), orientation=6)),
            sample("weak", "a faint ghost", [(0, 13)], [[1, 1, 30, 30]], [[[0, 13]]],
                   scores=[0.35], size=(64, 64), image=encode((64, 64), fmt="PNG"), ext="png"),
        ],
        "00001": [
            # human labels: no scores; one box grounding two spans
            sample("human", "a man and a woman", [(0, 5), (10, 17)], [[3, 3, 50, 40]],
                   [[[0, 5], [10, 17]]], size=(64, 48), image=encode((64, 48), fmt="WEBP"),
                   ext="webp", shard="00001"),
            # the same key as in shard 00000 (another source): written under another name
            sample("dog", "a black dog", [(0, 11)], [[0, 0, 63, 47]], [[[0, 11]]],
                   scores=[0.7], size=(64, 48), shard="00001"),
        ],
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("output")
    paths = []
    for name, samples in shard_samples().items():
        (root / f"{name}.tar").write_bytes(encode_shard(samples))
        paths.append(str(root / f"{name}.tar"))
    return paths, [s for samples in shard_samples().values() for s in samples]


def read_back(out, convention=BoxConvention.LEGACY) -> MdetrGroundingReader:
    return MdetrGroundingReader(MdetrReaderConfig(annotations=str(out / "mdetr.json"),
                                                  image_root=str(out), box_convention=convention))


@pytest.mark.parametrize("convention", [BoxConvention.LEGACY, BoxConvention.CONTINUOUS])
def test_mdetr_export_round_trips_through_the_mdetr_reader(shards, tmp_path, convention):
    paths, samples = shards
    summary = export_shards(paths, tmp_path, format="mdetr", box_convention=convention)
    assert summary["images"] == summary["samples"] == len(samples)
    assert summary["boxes"] == sum(len(s.boxes) for s in samples) and summary["renamed"] == 1
    assert summary["box_convention"] == convention.value
    reader = read_back(tmp_path, convention)
    assert reader.stats["degenerate_boxes"] == 0 and len(reader) == len(samples)
    for original, got in zip(samples, reader.samples()):
        assert got.caption == original.caption
        assert got.image == original.image and got.image_ext == original.image_ext
        assert (got.width, got.height) == (original.width, original.height)
        np.testing.assert_allclose(got.boxes, original.boxes, atol=1e-9)
        assert got.tokens_positive == original.tokens_positive
        spans = sorted({tuple(s) for t in original.tokens_positive for s in t})
        assert [(tuple(p.span), p.text) for p in got.phrases] == [
            (s, original.caption[s[0]:s[1]]) for s in spans]
    data = json.loads((tmp_path / "mdetr.json").read_text())
    assert data["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    assert data["info"]["box_convention"] == convention.value
    ann = data["annotations"][0]
    w = 120 - 20.5 + (1 if convention is BoxConvention.LEGACY else 0)
    assert ann["bbox"][2] == w and ann["category_id"] == 1 and ann["iscrowd"] == 0
    assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3]) and ann["score"] == 0.82
    assert [i["file_name"] for i in data["images"]] == [
        "images/dog.jpg", "images/rotated.jpg", "images/weak.png", "images/human.webp",
        "images/00001-dog.jpg"]
    # tokens_positive_eval lists the grounded phrases, so the reader's evaluation targets work
    targets = reader.grounding_targets()
    assert [(t.image_id, t.text) for t in targets][:2] == [(1, "a brown dog"), (1, "a red ball")]
    assert len(targets[1].boxes) == 2


def test_legacy_export_read_as_continuous_gives_the_exact_corners(shards, tmp_path):
    paths, samples = shards
    export_shards(paths, tmp_path, format="mdetr")                 # records are legacy boxes
    reader = read_back(tmp_path, BoxConvention.CONTINUOUS)
    x1, y1, x2, y2 = samples[0].boxes[0]
    assert reader[0].boxes[0] == [x1, y1, x2 + 1, y2 + 1]


def test_odvg_lines_parse_and_carry_every_region(shards, tmp_path):
    paths, samples = shards
    summary = export_shards(paths, tmp_path, format="odvg")
    lines = (tmp_path / "odvg.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == summary["images"] == len(samples)
    for original, line in zip(samples, map(json.loads, lines)):
        assert set(line) == {"filename", "height", "width", "grounding"}
        assert (line["width"], line["height"]) == (original.width, original.height)
        assert (tmp_path / line["filename"]).read_bytes() == original.image
        assert line["grounding"]["caption"] == original.caption
        regions = line["grounding"]["regions"]
        assert len(regions) == len(original.boxes)
        for i, region in enumerate(regions):
            x1, y1, x2, y2 = original.boxes[i]                    # legacy -> exact corners
            assert region["bbox"] == [x1, y1, min(x2 + 1, original.width),
                                      min(y2 + 1, original.height)]
            assert region["tokens_positive"] == original.tokens_positive[i]
            if original.scores:
                assert region["score"] == original.scores[i]
            else:
                assert "score" not in region
    dog = json.loads(lines[0])["grounding"]["regions"]
    assert [r["phrase"] for r in dog] == ["a brown dog", "a red ball", "a red ball"]
    assert dog[1]["bbox"] == [140, 60, 200, 120]                  # clipped to the image
    assert json.loads(lines[3])["grounding"]["regions"][0]["phrase"] == "a man a woman"


def test_min_score_removes_boxes_and_skips_images_left_without_one(shards, tmp_path):
    paths, samples = shards
    summary = export_shards(paths, tmp_path, format="odvg", min_score=0.6)
    # dog: 0.4 removed; weak (0.35) has no box left; human labels (no scores) stay
    assert summary["boxes_below_min_score"] == 2 and summary["skipped_no_boxes"] == 1
    assert summary["images"] == len(samples) - 1
    lines = [json.loads(x) for x in (tmp_path / "odvg.jsonl").read_text().splitlines()]
    assert [x["filename"] for x in lines] == ["images/dog.jpg", "images/rotated.jpg",
                                              "images/human.webp", "images/00001-dog.jpg"]
    assert [r["score"] for r in lines[0]["grounding"]["regions"]] == [0.82, 0.61]
    assert not (tmp_path / "images" / "weak.png").exists()
    mdetr = export_shards(paths, tmp_path / "m", format="mdetr", min_score=0.6)
    reader = read_back(tmp_path / "m")
    assert len(reader) == mdetr["images"] == 4 and reader.stats["boxes"] == mdetr["boxes"] == 5


def test_bad_arguments_and_damaged_shards_leave_no_annotation_file(shards, tmp_path):
    paths, _ = shards
    with pytest.raises(ValueError, match="format: 'coco' is not an export format"):
        export_shards(paths, tmp_path, format="coco")
    with pytest.raises(ValueError, match="box_convention"):
        export_shards(paths, tmp_path, format="odvg", box_convention="xywh")
    damaged = tmp_path / "00002.tar"
    damaged.write_bytes(open(paths[1], "rb").read()[:1200])
    with pytest.raises(ValueError, match=r"00002\.tar: .*it is truncated"):
        export_shards(paths + [str(damaged)], tmp_path / "out", format="odvg")
    assert not (tmp_path / "out" / "odvg.jsonl").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    samples = list(iter_output_samples(paths[:1]))
    with pytest.raises(ValueError, match="image_ext: 'gif'"):
        export_samples([dataclasses.replace(samples[0], image_ext="gif")], tmp_path / "g",
                       format="mdetr")


def test_shards_and_export_on_an_fsspec_url(shards):
    import fsspec

    fs = fsspec.filesystem("memory")
    paths, samples = shards
    for path in paths:
        fs.pipe_file(f"/in/{path.rsplit('/', 1)[-1]}", open(path, "rb").read())
    summary = export_shards([f"memory://in/{p.rsplit('/', 1)[-1]}" for p in paths], "memory://exp",
                            format="odvg")
    assert summary["images"] == len(samples)
    lines = fs.cat_file("/exp/odvg.jsonl").decode().splitlines()
    assert [json.loads(x)["filename"] for x in lines][0] == "images/dog.jpg"
    assert fs.cat_file("/exp/images/dog.jpg") == samples[0].image
    fs.rm("/exp", recursive=True)
    fs.rm("/in", recursive=True)
