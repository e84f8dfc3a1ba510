"""Ingest: full decode, bombs refused before decoding, EXIF-oriented sizes, caption checks."""
from __future__ import annotations

import io
import random

import pytest
from PIL import Image, ImageFile

from core.config import ConfigError, from_dict
from stages.ingest import Ingest, IngestConfig
from stages.schema import DropReason, Sample
from stages.shards import read_shard
from synth.web import bomb_png, make_image

NOUN_PHRASE_REASONS = {DropReason.NO_PHRASES}


def _sample(image: bytes | None, caption: bytes | None = b"a brown dog on the beach",
            ext: str = "jpg") -> Sample:
    return Sample(key="k", input_shard="s", image=image, image_ext=ext, raw_caption=caption)


def _image(fmt="JPEG", size=(64, 48), mode="RGB", **kw) -> bytes:
    return make_image(random.Random(0), fmt, size, mode, **kw)


def _ingest(sample: Sample, **config) -> Sample:
    Ingest(IngestConfig(**config))([sample])
    return sample


def test_synthetic_cases_get_their_reasons_and_sizes(synthetic_shards):
    root, expected = synthetic_shards
    for shard in ("00000", "00001"):
        with open(root / f"{shard}.tar", "rb") as fh:
            contents = read_shard(fh, shard)
        originals = {s.key: s.image for s in contents}
        Ingest()(contents.samples)
        assert len(contents) == sum(1 for (sh, _) in expected if sh == shard)
        for sample in contents:
            want = expected[(shard, sample.key)]
            if want.reason is None or want.reason in NOUN_PHRASE_REASONS:
                assert sample.kept, (want.case, sample.drop_reason, sample.drop_detail)
                assert sample.image is originals[sample.key]       # the very same bytes
                if want.size is not None:
                    assert (sample.width, sample.height) == want.size, want.case
            else:
                assert sample.drop_reason is want.reason, (want.case, sample.drop_detail)
                assert sample.image is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_swaps_width_and_height_for_5_to_8(orientation):
    sample = _ingest(_sample(_image("JPEG", (90, 40), exif_orientation=orientation)))
    assert sample.kept
    assert (sample.width, sample.height) == ((40, 90) if orientation >= 5 else (90, 40))


@pytest.mark.parametrize("fmt,mode,ext", [
    ("JPEG", "CMYK", "jpg"), ("JPEG", "L", "jpg"), ("PNG", "RGBA", "png"), ("PNG", "P", "png"),
    ("PNG", "LA", "png"), ("PNG", "I;16", "png"), ("WEBP", "RGB", "webp"), ("WEBP", "RGBA", "webp"),
    ("PNG", "1", "png"),
])
def test_unusual_but_valid_images_are_kept_with_their_bytes(fmt, mode, ext):
    data = _image(fmt, (50, 70), mode)
    sample = _ingest(_sample(data, ext=ext))
    assert sample.kept, sample.drop_detail
    assert (sample.width, sample.height) == (50, 70) and sample.image is data


def test_truncated_images_do_not_pass():
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = make_image(random.Random(1), fmt, (200, 150))
        sample = _ingest(_sample(data[: len(data) // 2]))
        assert sample.drop_reason is DropReason.DECODE_ERROR, (fmt, sample.drop_detail)


@pytest.mark.parametrize("data", [b"", b"<html>404</html>", b"\xff\xd8\xff" + b"\x00" * 50])
def test_zero_byte_and_non_image_bytes_are_decode_errors(data):
    assert _ingest(_sample(data)).drop_reason is DropReason.DECODE_ERROR


def test_other_formats_are_refused_without_opening_them():
    for fmt in ("GIF", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "red").save(buf, fmt)
        sample = _ingest(_sample(buf.getvalue()))
        assert sample.drop_reason is DropReason.DECODE_ERROR
        assert "not a JPEG, PNG or WebP" in sample.drop_detail


def test_bomb_is_refused_on_its_header_before_any_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("a decompression bomb must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    small = _image("PNG", (100, 100))
    assert _ingest(_sample(small, ext="png"), max_pixels=9_999).drop_reason \
        is DropReason.DECOMPRESSION_BOMB
    # A real bomb: 20000x20000 pixels in 48 KB. PIL's own check fires in Image.open too.
    bomb = _sample(bomb_png(), ext="png")
    assert _ingest(bomb).drop_reason is DropReason.DECOMPRESSION_BOMB
    assert _ingest(_sample(bomb_png(), ext="png"), max_pixels=10**12, max_size=10**6) \
        .drop_reason is DropReason.DECOMPRESSION_BOMB          # PIL's error maps there too


def test_max_pixels_is_inclusive():
    assert _ingest(_sample(_image("PNG", (100, 100)), ext="png"), max_pixels=10_000).kept


@pytest.mark.parametrize("size,reason", [
    ((32, 32), None), ((31, 200), DropReason.TOO_SMALL), ((200, 31), DropReason.TOO_SMALL),
    ((2, 2), DropReason.TOO_SMALL), ((400, 64), None), ((401, 64), DropReason.TOO_LARGE),
])
def test_size_limits(size, reason):
    sample = _ingest(_sample(_image("PNG", size), ext="png"), max_size=400)
    assert sample.drop_reason is reason
    assert (sample.width, sample.height) == size          # recorded for the stats either way


@pytest.mark.parametrize("raw,reason,caption", [
    (b"  a dog on a mat \n", None, "a dog on a mat"),
    ("\ufeffa caf\u00e9 table".encode(), None, "a caf\u00e9 table"),
    (None, DropReason.NO_CAPTION, None),
    (b"", DropReason.NO_CAPTION, ""),
    (b" \t\r\n ", DropReason.NO_CAPTION, ""),
    (b"a red \xff\xfe bus", DropReason.CAPTION_DECODE_ERROR, None),
    (("word " * 200).encode(), None, ("word " * 200).strip()),       # 999 chars
    (("a" * 1001).encode(), DropReason.CAPTION_TOO_LONG, "a" * 1001),
])
def test_caption_checks(raw, reason, caption):
    sample = _ingest(_sample(_image(), caption=raw))
    assert sample.drop_reason is reason
    assert sample.caption == caption


def test_a_bad_caption_costs_no_image_decode(monkeypatch):
    def no_open(*args, **kwargs):
        raise AssertionError("the image must not be opened")

    monkeypatch.setattr(Image, "open", no_open)
    assert _ingest(_sample(b"not even an image", caption=b" ")).drop_reason \
        is DropReason.NO_CAPTION


def test_dropped_samples_pass_through_and_order_is_kept():
    first = _sample(_image())
    already = _sample(_image())
    already.drop(DropReason.UNSAFE_NAME, "earlier")
    last = _sample(None)
    batch = [first, already, last]
    out = Ingest()(batch)
    assert out is batch and out == [first, already, last]
    assert first.kept and already.drop_reason is DropReason.UNSAFE_NAME
    assert already.drop_detail == "earlier" and last.drop_reason is DropReason.NO_IMAGE


def test_refuses_to_run_when_truncated_images_are_allowed(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        Ingest()([_sample(_image())])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="min_size"):
        Ingest(IngestConfig(min_size=0))
    with pytest.raises(ValueError, match="min_size .* larger than max_size"):
        Ingest(IngestConfig(min_size=500, max_size=400))
    with pytest.raises(ConfigError, match="max_caption_chars"):
        from_dict(IngestConfig, {"max_caption_chars": -1})
    assert from_dict(IngestConfig, {"min_size": 16}).min_size == 16
