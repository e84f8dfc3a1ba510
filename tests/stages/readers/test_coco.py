"""COCO-format detection reader: conventions, crowd/empty handling, laziness, URLs, errors."""
from __future__ import annotations

import io
import json

import fsspec
import pytest
from PIL import Image

from core.config import ConfigError, from_dict
from stages.readers import (BoxConvention, CocoDetectionReader, CocoReaderConfig, DatasetFormatError,
                            xywh_to_xyxy, xyxy_to_xywh)
from stages.schema import DropReason


def _image_bytes(size=(100, 80), fmt="JPEG", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def coco_dict() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "sub/b.png", "width": 100, "height": 80},
            {"id": 3, "file_name": "c.jpg", "width": 100, "height": 80},       # no annotation
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "person"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40], "iscrowd": 0},
            {"id": 11, "image_id": 2, "category_id": 7, "bbox": [90, 70, 20, 20]},       # clipped
            {"id": 12, "image_id": 1, "category_id": 7, "bbox": [0, 0, 50, 50], "iscrowd": 1},
            {"id": 13, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0.5, 10]},        # empty (legacy)
            {"id": 14, "image_id": 1, "category_id": 7, "bbox": [60, 10, 20, 20]},
        ],
    }


@pytest.fixture
def coco_files(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(_image_bytes())
    (root / "sub" / "b.png").write_bytes(_image_bytes(fmt="PNG"))
    (root / "c.jpg").write_bytes(_image_bytes())
    ann = tmp_path / "instances_val.json"
    ann.write_text(json.dumps(coco_dict()))
    return ann, root


def _reader(ann, root, **kw) -> CocoDetectionReader:
    return CocoDetectionReader(CocoReaderConfig(annotations=str(ann), image_root=str(root), **kw))


def test_index_legacy_convention_crowd_and_empty_boxes(coco_files):
    reader = _reader(*coco_files)
    assert len(reader) == 3
    assert reader.categories == {3: "person", 7: "dog"}              # id order
    assert reader.category_names == ["person", "dog"]
    first = reader[0]
    # [10, 20, 30, 40] -> x2 = 10 + 30 - 1, y2 = 20 + 40 - 1; the crowd and the 0.5-wide box are left out
    assert first.boxes == [[10.0, 20.0, 39.0, 59.0], [60.0, 10.0, 79.0, 29.0]]
    assert first.category_ids == [3, 7]
    assert first.annotation_ids == [10, 14]
    assert first.crowd_boxes == [[0.0, 0.0, 49.0, 49.0]]
    # [90, 70, 20, 20] in a 100 x 80 image: clipped to [W - 1, H - 1] under legacy
    assert reader[1].boxes == [[90.0, 70.0, 99.0, 79.0]]
    assert reader[2].boxes == [] and reader[2].file_name == "c.jpg"
    assert reader.stats == {"images_in_file": 3, "images": 3, "images_without_boxes": 1, "annotations": 5,
                            "boxes": 3, "crowd_boxes": 1, "degenerate_boxes": 1, "clipped_boxes": 1}
    # per image, for the trainer's accounting: (left out as outside or empty, clipped)
    assert [reader.box_counts(i) for i in range(3)] == [(1, 0), (0, 1), (0, 0)]


def test_continuous_convention_and_dropping_empty_images(coco_files):
    reader = _reader(*coco_files, box_convention=BoxConvention.CONTINUOUS, keep_images_without_boxes=False)
    assert len(reader) == 2
    assert reader[0].boxes == [[10.0, 20.0, 40.0, 60.0], [5.0, 5.0, 5.5, 15.0], [60.0, 10.0, 80.0, 30.0]]
    assert reader[1].boxes == [[90.0, 70.0, 100.0, 80.0]]
    assert reader.stats["degenerate_boxes"] == 0


def test_box_conversions_round_trip():
    for convention in BoxConvention:
        xyxy = xywh_to_xyxy([3.5, 4, 10, 20.25], convention)
        assert xyxy_to_xywh(xyxy, convention) == [3.5, 4.0, 10.0, 20.25]
    assert xywh_to_xyxy([0, 0, 10, 10], "legacy") == [0, 0, 9, 9]
    assert xywh_to_xyxy([0, 0, 10, 10], "continuous") == [0, 0, 10, 10]


def test_samples_read_bytes_lazily(coco_files):
    ann, root = coco_files
    reader = _reader(ann, root)
    (root / "c.jpg").unlink()             # after the index was built: only reading notices
    samples = list(reader.samples())
    assert [s.key for s in samples] == ["1", "2", "3"]
    assert samples[0].image == (root / "a.jpg").read_bytes() and samples[0].image_ext == "jpg"
    assert samples[1].image_ext == "png"
    assert samples[0].caption is None and samples[0].meta["category_ids"] == [3, 7]
    assert samples[0].width == 100 and samples[0].height == 80 and samples[0].source == "instances_val"
    assert samples[2].drop_reason is DropReason.NO_IMAGE and "c.jpg" in samples[2].drop_detail
    only = list(reader.samples(indices=[1], read_images=False))
    assert len(only) == 1 and only[0].image is None and only[0].boxes == [[90.0, 70.0, 99.0, 79.0]]


def test_fsspec_url_roots():
    fs = fsspec.filesystem("memory")
    fs.pipe("/coco_t/images/a.jpg", _image_bytes())
    fs.pipe("/coco_t/images/sub/b.png", _image_bytes(fmt="PNG"))
    fs.pipe("/coco_t/images/c.jpg", _image_bytes())
    fs.pipe("/coco_t/ann.json", json.dumps(coco_dict()).encode())
    reader = _reader("memory://coco_t/ann.json", "memory://coco_t/images")
    samples = list(reader.samples())
    assert all(s.kept for s in samples)
    assert samples[1].image == fs.cat("/coco_t/images/sub/b.png")


def test_lvis_style_file(tmp_path):
    data = {
        "images": [{"id": 5, "coco_url": "http://images.cocodataset.org/val2017/000000000005.jpg",
                    "width": 64, "height": 64, "neg_category_ids": [2], "not_exhaustive_category_ids": []}],
        "categories": [{"id": 1, "name": "aardvark", "frequency": "r"}, {"id": 2, "name": "bus", "frequency": "f"}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 2, 3, 4], "area": 12}],
    }
    (tmp_path / "val2017").mkdir()
    ann = tmp_path / "lvis_v1_val.json"
    ann.write_text(json.dumps(data))
    reader = _reader(ann, tmp_path)
    image = reader[0]
    assert image.file_name == "val2017/000000000005.jpg"
    assert image.neg_category_ids == [2] and image.not_exhaustive_category_ids == []
    assert reader.category_frequency == {1: "r", 2: "f"}
    data["images"][0]["neg_category_ids"] = [99]
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=r"images\[0\]\.neg_category_ids\[0\]: unknown category id 99"):
        _reader(ann, tmp_path)


def _broken(tmp_path, mutate):
    data = coco_dict()
    mutate(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["annotations"][1].update(bbox=[1, 2]),
     r"broken\.json: annotations\[1\]\.bbox: expected 4 numbers \[x, y, w, h\], got \[1, 2\]\. Fix: "),
    (lambda d: d["annotations"][1].update(image_id=999),
     r"annotations\[1\]\.image_id: annotation 1 refers to image_id 999 that is not in images"),
    (lambda d: d["annotations"][0].update(category_id=42),
     r"annotations\[0\]\.category_id: annotation 0 refers to unknown category id 42"),
    (lambda d: d["annotations"][0].update(bbox=[10, 10, 5, -3]),
     r"annotations\[0\]\.bbox: negative width or height .*\[x1, y1, x2, y2\]"),
    (lambda d: d["annotations"][0].update(bbox=[10, 10, "5", 3]), r"annotations\[0\]\.bbox: expected 4 numbers"),
    (lambda d: d["annotations"][0].update(iscrowd=2), r"annotations\[0\]\.iscrowd: expected 0 or 1"),
    (lambda d: d["images"].append({"id": 1, "file_name": "x.jpg"}),
     r"images\[3\]\.id: image id 1 is used again \(first at images\[0\]\)"),
    (lambda d: d["images"][0].pop("file_name"), r"images\[0\]\.file_name: expected a non-empty string"),
    (lambda d: d["images"][0].update(width=0), r"images\[0\]\.width: must be positive"),
    (lambda d: d["categories"][0].update(name=""), r"categories\[0\]\.name: expected a non-empty string"),
    (lambda d: d["categories"].append({"id": 7, "name": "cat"}), r"categories\[2\]\.id: category id 7 is used again"),
    (lambda d: d.pop("categories"), r"broken\.json: categories: missing"),
])
def test_malformed_files_name_file_field_and_fix(tmp_path, coco_files, mutate, message):
    with pytest.raises(DatasetFormatError, match=message) as info:
        _reader(_broken(tmp_path, mutate), coco_files[1])
    assert "Fix: " in str(info.value)


def test_unreadable_inputs_fail_at_start(tmp_path, coco_files):
    ann, root = coco_files
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        _reader(tmp_path / "missing.json", root)
    with pytest.raises(FileNotFoundError, match="image_root = .*nowhere.* is not an existing folder"):
        _reader(ann, tmp_path / "nowhere")
    bad = tmp_path / "truncated.json"
    bad.write_text(json.dumps(coco_dict())[:-20])
    with pytest.raises(DatasetFormatError, match=r"truncated\.json: \(file\): not valid JSON"):
        _reader(bad, root)
    with pytest.raises(ValueError, match="image_root is empty"):
        CocoDetectionReader(CocoReaderConfig(annotations=str(ann)))


def test_typed_config(coco_files):
    ann, root = coco_files
    cfg = from_dict(CocoReaderConfig, {"annotations": str(ann), "image_root": str(root),
                                       "box_convention": "continuous"})
    assert cfg.box_convention is BoxConvention.CONTINUOUS
    with pytest.raises(ConfigError, match="'legacy', 'continuous'"):
        from_dict(CocoReaderConfig, {"annotations": str(ann), "image_root": str(root), "box_convention": "xyxy"})
