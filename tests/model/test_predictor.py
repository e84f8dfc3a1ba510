"""Predictor: detection with class names, grounding with phrase spans, in the original frame."""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import ImageOps

from model.postprocess import PostProcessor
from model.prompts import build_prompt, prompt_positive_maps
from model.predictor import Predictor
from model.transforms import Preprocessor, boxes_to_original

NAMES = ["person", "necktie", "flag"]


@pytest.fixture(scope="module")
def predictor(tiny_model) -> Predictor:
    return Predictor(tiny_model, batch_size=2, min_size=96, max_size=128)


def test_detect_returns_boxes_in_the_original_frame(predictor, tiny_model, photo):
    (det,) = predictor.detect([photo], NAMES)
    assert 0 < len(det) <= predictor.inference.detections_per_image
    assert det.boxes.shape == (len(det), 4) and det.scores.shape == det.labels.shape == (len(det),)
    assert (det.scores[:-1] >= det.scores[1:]).all()
    assert det.phrases == [NAMES[i] for i in det.labels.tolist()]
    w, h = photo.size
    assert (det.boxes >= 0).all() and (det.boxes[:, [0, 2]] <= w).all() and (det.boxes[:, [1, 3]] <= h).all()

    # the same as running the parts by hand: preprocess, network, post-processing, rescale
    batch = Preprocessor(tiny_model.cfg.input, 96, 128)([photo])
    enc, maps = prompt_positive_maps(tiny_model.tokenizer, [build_prompt(NAMES)], 256, False)
    with torch.no_grad():
        out = tiny_model(batch.images, batch.image_sizes, enc["input_ids"], enc["attention_mask"])
    ref = PostProcessor(tiny_model.cfg.inference)(out, maps, batch.image_sizes)[0]
    order = ref["scores"].argsort(descending=True, stable=True)
    torch.testing.assert_close(det.boxes, boxes_to_original(ref["boxes"][order], batch.image_sizes[0], (h, w)))
    assert torch.equal(det.labels, ref["labels"][order])


def test_image_inputs_of_every_kind_give_the_same_result(predictor, photo, tmp_path):
    photo.save(tmp_path / "p.png")
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    results = predictor.detect([photo, np.asarray(photo), tmp_path / "p.png", buf.getvalue()], NAMES)
    for other in results[1:]:
        assert torch.equal(other.boxes, results[0].boxes) and torch.equal(other.scores, results[0].scores)


def test_batched_equals_per_item_for_same_sized_images(tiny_model, photo):
    images = [photo, ImageOps.mirror(photo), ImageOps.grayscale(photo).convert("RGB")]
    batched = Predictor(tiny_model, batch_size=3, min_size=96, max_size=128).detect(images, NAMES)
    single = Predictor(tiny_model, batch_size=1, min_size=96, max_size=128).detect(images, NAMES)
    for a, b in zip(batched, single):
        torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)


def test_long_vocabularies_are_chunked_with_global_labels(tiny_model, photo):
    chunked = Predictor(tiny_model, min_size=96, max_size=128,
                        inference=dataclasses.replace(tiny_model.cfg.inference, chunk_size=2))
    (det,) = chunked.detect([photo], NAMES)
    assert set(det.labels.tolist()) <= {0, 1, 2} and det.phrases == [NAMES[i] for i in det.labels.tolist()]
    # chunk results = each chunk run on its own, labels offset, merged by score
    (first,) = chunked.detect([photo], NAMES[:2])
    (second,) = chunked.detect([photo], NAMES[2:])
    expected = torch.cat([first.scores, second.scores]).sort(descending=True).values
    torch.testing.assert_close(det.scores, expected)
    assert (det.labels == 2).sum() == len(second)


def test_ground_phrases_of_a_caption(predictor, photo):
    caption = "a woman in a navy uniform and a tie"
    spans = [(0, 7), [(11, 25)], [(30, 35), (0, 7)]]         # the last phrase has two spans
    (det,) = predictor.ground([photo], caption, spans)
    assert len(det) > 0 and set(det.labels.tolist()) <= {0, 1, 2}
    names = ["a woman", "a navy uniform", "a tie a woman"]
    assert det.phrases == [names[i] for i in det.labels.tolist()]
    assert json.loads(json.dumps(det.as_dict()))["phrases"] == det.phrases

    per_image = predictor.ground([photo, photo], [caption, "a flag"], [spans, [(2, 6)]])
    torch.testing.assert_close(per_image[0].scores, det.scores)
    assert set(per_image[1].phrases) == {"flag"}


def test_empty_and_invalid_inputs(predictor, photo):
    assert predictor.detect([], NAMES) == []
    (none,) = predictor.detect([photo], [])
    assert len(none) == 0 and none.boxes.shape == (0, 4)
    (none,) = predictor.ground([photo], "a caption without phrases", [])
    assert len(none) == 0
    with pytest.raises(ValueError, match="outside caption"):
        predictor.ground([photo], "short", [(0, 50)])
    with pytest.raises(ValueError, match="captions"):
        predictor.ground([photo, photo], ["one caption"], [[(0, 3)]])
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(predictor.model, batch_size=0)
