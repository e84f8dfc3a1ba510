"""MDETR grounding reader: captions, spans -> phrases, eval targets, image roots, errors."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from stages.readers import DatasetFormatError, MdetrGroundingReader, MdetrReaderConfig
from stages.schema import DropReason

CAPTION0 = "A man in a red shirt throws a ball to a dog ."
#           0123456789012345678901234567890123456789012345
# spans:    "A man" [0, 5], "a red shirt" [9, 20], "a ball" [28, 34], "a dog" [38, 43]
CAPTION1 = "Two people play fetch ."


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (10, 120, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def flickr_dict() -> dict:
    # Two captions of one photo (MDETR writes one images[] entry per sentence); sizes are strings
    # as in MDETR's Flickr files.
    base = {"file_name": "1000.jpg", "height": "90", "width": "120", "dataset_name": "flickr",
            "original_img_id": 1000, "tokens_negative": [[0, 10]]}
    return {
        "images": [
            {**base, "id": 0, "caption": CAPTION0, "sentence_id": 0,
             "tokens_positive_eval": [[[0, 5]], [[9, 20]], [[38, 43]]]},
            {**base, "id": 1, "caption": CAPTION1, "sentence_id": 1,
             "tokens_positive_eval": [[[0, 10]]]},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "bbox": [10, 10, 40, 60], "tokens_positive": [[0, 5], [9, 20]],
             "category_id": 1, "iscrowd": 0, "area": 2400},
            {"id": 1, "image_id": 0, "bbox": [80, 50, 30, 30], "tokens_positive": [[38, 43]],
             "category_id": 1, "iscrowd": 0, "area": 900},
            {"id": 2, "image_id": 0, "bbox": [60, 60, 0.5, 5], "tokens_positive": [[28, 34]],
             "category_id": 1, "iscrowd": 0, "area": 2.5},                      # empty under legacy
            {"id": 3, "image_id": 1, "bbox": [10, 10, 40, 60], "tokens_positive": [[0, 10]],
             "category_id": 1, "iscrowd": 0, "area": 2400},
            {"id": 4, "image_id": 1, "bbox": [80, 50, 30, 30], "tokens_positive": [[0, 10]],
             "category_id": 1, "iscrowd": 0, "area": 900},
        ],
        "categories": [{"id": 1, "name": "object"}],
    }


@pytest.fixture
def flickr_files(tmp_path):
    root = tmp_path / "flickr30k_images"
    root.mkdir()
    (root / "1000.jpg").write_bytes(_jpeg())
    ann = tmp_path / "final_flickr_separateGT_val.json"
    ann.write_text(json.dumps(flickr_dict()))
    return ann, root


def _reader(ann, root="", **kw) -> MdetrGroundingReader:
    return MdetrGroundingReader(MdetrReaderConfig(annotations=str(ann), image_root=str(root), **kw))


def test_grounding_samples(flickr_files):
    ann, root = flickr_files
    reader = _reader(ann, root)
    assert len(reader) == 2
    samples = list(reader.samples())
    s0 = samples[0]
    assert s0.kept and s0.image == (root / "1000.jpg").read_bytes() and s0.image_ext == "jpg"
    assert s0.caption == CAPTION0 and (s0.width, s0.height) == (120, 90) and s0.key == "0"
    # legacy x2 = x + w - 1; the 0.5-wide box and its span are left out together
    assert s0.boxes == [[10.0, 10.0, 49.0, 69.0], [80.0, 50.0, 109.0, 79.0]]
    assert s0.tokens_positive == [[[0, 5], [9, 20]], [[38, 43]]]
    assert [(p.text, p.span) for p in s0.phrases] == [("A man", (0, 5)), ("a red shirt", (9, 20)),
                                                      ("a dog", (38, 43))]
    assert s0.meta["original_img_id"] == 1000 and s0.meta["sentence_id"] == 0
    assert s0.meta["tokens_positive_eval"] == [[[0, 5]], [[9, 20]], [[38, 43]]]
    assert samples[1].phrases[0].text == "Two people" and len(samples[1].boxes) == 2
    assert reader.stats["degenerate_boxes"] == 1 and reader.stats["boxes"] == 4
    record = s0.to_record()                 # the grounding schema (docs/architecture.md)
    assert record["phrases"][1] == {"text": "a red shirt", "span": [9, 20]}


def test_grounding_targets_use_exact_xml_corners(flickr_files):
    targets = _reader(*flickr_files).grounding_targets()
    assert [t.key for t in targets] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    by_key = {t.key: t for t in targets}
    assert by_key[(0, 0)].text == "A man" and by_key[(0, 0)].boxes == [[10.0, 10.0, 50.0, 70.0]]
    assert by_key[(0, 1)].boxes == [[10.0, 10.0, 50.0, 70.0]]      # one box grounds two phrases
    assert by_key[(0, 2)].boxes == [[80.0, 50.0, 110.0, 80.0]]
    assert by_key[(1, 0)].boxes == [[10.0, 10.0, 50.0, 70.0], [80.0, 50.0, 110.0, 80.0]]
    assert by_key[(1, 0)].original_img_id == 1000 and by_key[(1, 0)].sentence_id == 1


def test_mixed_file_image_roots(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "vg").mkdir()
    (tmp_path / "vg" / "2.jpg").write_bytes(_jpeg())
    data = {"images": [{"id": 1, "file_name": "1.jpg", "caption": "a cat", "data_source": "coco"},
                       {"id": 2, "file_name": "2.jpg", "caption": "a bus", "data_source": "vg"}],
            "annotations": [{"image_id": 2, "bbox": [1, 1, 5, 5], "tokens_positive": [[0, 5]]}]}
    ann = tmp_path / "final_mixed_train_no_coco.json"
    ann.write_text(json.dumps(data))
    reader = _reader(ann, image_roots={"coco": str(tmp_path / "coco"), "vg": str(tmp_path / "vg")})
    samples = list(reader.samples())
    assert samples[0].drop_reason is DropReason.NO_IMAGE          # no file in coco/: dropped, no crash
    assert samples[1].kept and samples[1].image == (tmp_path / "vg" / "2.jpg").read_bytes()
    assert samples[0].boxes == [] and samples[1].boxes == [[1.0, 1.0, 5.0, 5.0]]   # no size: not clipped
    assert reader.grounding_targets() == []                          # no eval fields in a training file
    assert len(_reader(ann, image_roots={"coco": str(tmp_path / "coco"), "vg": str(tmp_path / "vg")},
                       keep_images_without_boxes=False)) == 1
    with pytest.raises(DatasetFormatError, match=r"images\[1\]\.data_source: 'vg' has no folder in image_roots"):
        _reader(ann, image_roots={"coco": str(tmp_path / "coco")})
    with pytest.raises(FileNotFoundError, match=r"image_roots\.vg = .* is not an existing folder"):
        _reader(ann, image_roots={"coco": str(tmp_path / "coco"), "vg": str(tmp_path / "nope")})


def _broken(tmp_path, mutate):
    data = flickr_dict()
    mutate(data)
    path = tmp_path / "broken_flickr.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["annotations"][1].update(tokens_positive=[[38, 43], [40, 52]]),
     r"broken_flickr\.json: annotations\[1\]\.tokens_positive\[1\]: span \[40, 52\] is outside the caption "
     r"\(45 characters\)"),
    (lambda d: d["annotations"][1].update(tokens_positive=[[5, 5]]), r"tokens_positive\[0\]: span \[5, 5\]"),
    (lambda d: d["annotations"][1].update(tokens_positive=[[1, 2, 3]]),
     r"annotations\[1\]\.tokens_positive\[0\]: expected a \[start, end\] pair of integers"),
    (lambda d: d["annotations"][1].update(tokens_positive=[0, 5]),
     r"annotations\[1\]\.tokens_positive\[0\]: expected a \[start, end\] pair"),
    (lambda d: d["annotations"][1].pop("tokens_positive"), r"annotations\[1\]\.tokens_positive: missing"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"annotations\[1\]\.bbox: expected 4 numbers"),
    (lambda d: d["annotations"][1].update(image_id=77),
     r"annotations\[1\]\.image_id: annotation 1 refers to image_id 77 that is not in images"),
    (lambda d: d["images"][1].update(tokens_positive_eval=[[[0, 99]]]),
     r"images\[1\]\.tokens_positive_eval\[0\]\[0\]: span \[0, 99\] is outside the caption \(23 characters\)"),
    (lambda d: d["images"][0].pop("caption"), r"images\[0\]\.caption: expected a string"),
    (lambda d: d["images"][0].update(height="tall"), r"images\[0\]\.height: expected an integer"),
])
def test_malformed_files_name_file_field_and_fix(tmp_path, flickr_files, mutate, message):
    with pytest.raises(DatasetFormatError, match=message) as info:
        _reader(_broken(tmp_path, mutate), flickr_files[1])
    assert "Fix: " in str(info.value)


def test_eval_phrase_without_box_is_an_error(tmp_path, flickr_files):
    # "play fetch" [11, 21] of caption 1 has no annotation: fine for training, not for evaluation
    path = _broken(tmp_path, lambda d: d["images"][1]["tokens_positive_eval"].append([[11, 21]]))
    reader = _reader(path, flickr_files[1])
    assert len(list(reader.samples(read_images=False))) == 2
    with pytest.raises(DatasetFormatError, match=r"broken_flickr\.json: images\[1\]\.tokens_positive_eval\[1\]: "
                       r"no annotation of image 1 has the span\(s\) \[\(11, 21\)\]"):
        reader.grounding_targets()


def test_eval_targets_keep_boxes_that_training_drops(tmp_path, flickr_files):
    # "a ball" [28, 34]'s only box is 0.5 px wide: not a training target, still the phrase's ground truth
    path = _broken(tmp_path, lambda d: d["images"][0]["tokens_positive_eval"].append([[28, 34]]))
    reader = _reader(path, flickr_files[1])
    assert [[28, 34]] not in reader[0].tokens_positive
    target = {t.key: t for t in reader.grounding_targets()}[(0, 3)]
    assert target.text == "a ball" and target.boxes == [[60.0, 60.0, 60.5, 65.0]]
