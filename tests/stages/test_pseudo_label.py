"""The teacher stage on CPU with the tiny model (seeded random head: a fixture the test builds)."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image, ImageDraw

from stages.ingest import Ingest, IngestConfig
from stages.pseudo_label import PseudoLabel, PseudoLabelConfig, top_per_label
from stages.schema import DropReason, Phrase, Sample



@pytest.fixture(scope="module")
def stage(tiny_teacher, teacher_overrides):
    st = PseudoLabel(PseudoLabelConfig(checkpoint=str(tiny_teacher), model_overrides=teacher_overrides,
                                       min_score=0.05, batch_size=4))
    st.setup()
    return st


def _jpeg(size=(160, 96), exif_orientation=None, color=(200, 40, 40)):
    im = Image.new("RGB", size, (240, 240, 230))
    ImageDraw.Draw(im).ellipse([10, 10, size[0] // 2, size[1] // 2], fill=color)
    buf = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    else:
        im.save(buf, "JPEG", quality=95)
    return buf.getvalue(), im


CAPTION = "a red ball on a white table"
PHRASES = [Phrase("a red ball", (0, 10)), Phrase("a white table", (14, 27))]


def _sample(key, image_bytes, caption=CAPTION, phrases=PHRASES):
    s = Sample(key=key, input_shard="00000", image=image_bytes, image_ext="jpg",
               raw_caption=caption.encode())
    Ingest(IngestConfig(min_size=16, max_caption_chars=5000))([s])
    assert s.kept, s.drop_detail
    s.phrases = list(phrases)
    return s


def test_boxes_are_in_the_exif_oriented_frame_within_bounds(stage):
    data, im = _jpeg(exif_orientation=6)
    rotated = _sample("r", data)
    assert (rotated.width, rotated.height) == (96, 160)          # orientation 6: w/h swap
    # the same pixels stored already rotated, without EXIF
    buf = io.BytesIO()
    im.transpose(Image.Transpose.ROTATE_270).save(buf, "JPEG", quality=95)
    upright = _sample("u", buf.getvalue())
    stage([rotated, upright])
    assert rotated.kept and rotated.boxes
    for box in rotated.boxes:
        x1, y1, x2, y2 = box
        assert 0 <= x1 <= x2 <= rotated.width and 0 <= y1 <= y2 <= rotated.height
    # JPEG re-encoding differs by a few grey levels: compare the best box loosely
    assert torch.allclose(torch.tensor(rotated.boxes[0]), torch.tensor(upright.boxes[0]), atol=8.0)


def test_labels_reference_the_phrases_and_respect_thresholds(stage, tiny_teacher, teacher_overrides):
    data, _ = _jpeg()
    s = _sample("a", data)
    stage([s])
    assert s.kept and len(s.boxes) == len(s.scores) == len(s.tokens_positive) <= stage.config.max_boxes
    spans = {p.span for p in s.phrases}
    for tp in s.tokens_positive:
        assert len(tp) == 1 and tuple(tp[0]) in spans
    assert all(score >= 0.05 for score in s.scores)
    assert s.scores == sorted(s.scores, reverse=True)
    assert s.labeler["min_score"] == 0.05 and len(s.labeler["checkpoint_sha256"]) == 64

    strict = PseudoLabel(PseudoLabelConfig(checkpoint=str(tiny_teacher), model_overrides=teacher_overrides,
                                           min_score=max(s.scores) + 1e-3))
    s2 = _sample("b", data)
    strict([s2])
    assert not s2.kept and s2.drop_reason is DropReason.NO_BOXES


def test_max_boxes_per_phrase_keeps_each_phrases_best(stage, tiny_teacher, teacher_overrides):
    data, _ = _jpeg()
    every = _sample("all", data)
    stage([every])
    assert every.kept
    one = PseudoLabel(PseudoLabelConfig(checkpoint=str(tiny_teacher), model_overrides=teacher_overrides,
                                        min_score=0.05, max_boxes_per_phrase=1))
    s = _sample("one", data)
    one([s])
    spans = [tuple(tp[0]) for tp in s.tokens_positive]
    assert len(spans) == len(set(spans)) >= 1                      # one box per phrase at most
    # each phrase keeps exactly its best box of the unlimited run
    best = {}
    for box, score, tp in zip(every.boxes, every.scores, every.tokens_positive):
        best.setdefault(tuple(tp[0]), (box, score))
    assert {sp: (b, sc) for sp, b, sc in zip(spans, s.boxes, s.scores)} == best
    assert s.labeler["max_boxes_per_phrase"] == 1


def test_top_per_label_properties():
    assert top_per_label([], [], 1) == []
    scores, labels = [0.2, 0.9, 0.5, 0.7, 0.1], [0, 1, 0, 1, 2]
    assert top_per_label(scores, labels, 1) == [1, 2, 4]
    assert top_per_label(scores, labels, 2) == [1, 3, 2, 0, 4]
    assert top_per_label(scores, labels, 9) == sorted(range(5), key=lambda i: -scores[i])


def test_output_is_deterministic_and_batched_equals_single(stage):
    data, _ = _jpeg()
    batch = [_sample(str(i), data) for i in range(3)]
    stage(batch)
    single = _sample("x", data)
    stage([single])
    for s in batch:
        assert s.boxes == single.boxes and s.scores == single.scores


def test_phrases_past_the_text_limit_are_removed_and_counted(stage):
    data, _ = _jpeg()
    filler = " and".join([" a cat"] * 200)                      # > 256 tokens
    caption = "a red ball" + filler + " with a hat"
    phrases = [Phrase("a red ball", (0, 10)), Phrase("a hat", (len(caption) - 5, len(caption)))]
    s = _sample("t", data, caption=caption, phrases=phrases)
    stage([s])
    assert s.meta["phrases_truncated"] == 1
    assert [p.text for p in s.phrases] == ["a red ball"]
    only_late = _sample("t2", data, caption=caption, phrases=[phrases[1]])
    stage([only_late])
    assert only_late.drop_reason is DropReason.NO_PHRASES


def test_dropped_samples_pass_through_and_empty_batch(stage):
    assert stage([]) == []
    s = Sample(key="d", input_shard="0")
    s.drop(DropReason.DECODE_ERROR)
    assert stage([s]) == [s] and s.drop_reason is DropReason.DECODE_ERROR
