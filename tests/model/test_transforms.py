"""Inference preprocessing (official test pipeline) and the inverse box mapping."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from model.config import InputConfig
from model.transforms import (Preprocessor, boxes_to_original, boxes_to_resized, load_image, normalize,
                              pad_batch, resized_size)

CFG = InputConfig()


@pytest.mark.parametrize("hw, expected", [
    ((480, 640), (800, 1066)),      # short side to 800
    ((640, 480), (1066, 800)),
    ((1000, 100), (1330, 133)),     # the long side would exceed 1333: short side shrinks to 133
    ((800, 1200), (800, 1200)),     # already there: unchanged
    ((500, 500), (800, 800)),
])
def test_resized_size_matches_the_official_rule(hw, expected):
    assert resized_size(*hw, 800, 1333) == expected
    h, w = resized_size(*hw, 800, 1333)
    assert max(h, w) <= 1333


def test_preprocessing_is_bit_identical_to_the_official_op_chain(photo):
    """torchvision resize (PIL) -> to_tensor -> BGR x255 -> normalize, as maskrcnn_benchmark."""
    pre = Preprocessor(CFG, min_size=300, max_size=400)
    ours, resized, original = pre.transform(photo)
    ref = TF.resize(photo, list(resized))
    ref = TF.to_tensor(ref)[[2, 1, 0]] * 255
    ref = TF.normalize(ref, mean=list(CFG.pixel_mean), std=list(CFG.pixel_std))
    assert original == (600, 512) and resized == (351, 300)
    assert torch.equal(ours, ref)


def test_normalize_is_bgr_255():
    red = Image.new("RGB", (2, 1), (255, 0, 0))
    t = normalize(red, CFG.pixel_mean, CFG.pixel_std)
    assert t.shape == (3, 1, 2)
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([
        (0 - 103.530) / 57.375, (0 - 116.280) / 57.120, (255 - 123.675) / 58.395]))


def test_batch_is_zero_padded_to_a_multiple_of_32(photo):
    pre = Preprocessor(CFG, min_size=100, max_size=200)
    small = photo.resize((90, 60))
    batch = pre([photo, small])
    assert batch.original_sizes == [(600, 512), (60, 90)]
    assert batch.image_sizes == [(117, 100), (100, 150)]
    assert batch.images.shape == (2, 3, 128, 160)
    assert (batch.images[0, :, 117:] == 0).all() and (batch.images[0, :, :, 100:] == 0).all()
    for i in range(2):
        single, _, _ = pre.transform([photo, small][i])
        h, w = batch.image_sizes[i]
        assert torch.equal(batch.images[i, :, :h, :w], single)


def test_pad_batch_rejects_empty_input():
    with pytest.raises(ValueError):
        pad_batch([], 32)


def test_boxes_map_back_to_the_original_frame():
    boxes = torch.tensor([[10.0, 20.0, 110.0, 220.0], [0.0, 0.0, 799.0, 1065.0]])
    original = boxes_to_original(boxes, (800, 1066), (480, 640))
    torch.testing.assert_close(original[0], torch.tensor([10 * 640 / 1066, 20 * 0.6, 110 * 640 / 1066, 220 * 0.6]))
    torch.testing.assert_close(boxes_to_resized(original, (480, 640), (800, 1066)), boxes)
    assert boxes_to_original(torch.zeros(0, 4), (800, 1066), (480, 640)).shape == (0, 4)


def test_load_image_inputs(tmp_path, photo):
    arr = np.asarray(photo)
    assert load_image(arr).size == (512, 600)
    assert load_image(arr[:, :, 0]).mode == "RGB"                      # grey -> RGB
    # a file whose EXIF says "rotate 90°": loaded in the displayed frame
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    assert load_image(buf.getvalue()).size == (40, 20)
    with pytest.raises(ValueError):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(TypeError):
        load_image(3.0)


# ------------------------------------------------------------------ the teacher's feed (uint8 + device)
from model.transforms import ResizeAt, decode_for_device, device_batch  # noqa: E402


def _noisy_jpeg(size, exif_orientation=None) -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    arr = np.stack([x / 640 * 255, y / 480 * 255, (x + y) % 255], -1) + rng.normal(0, 20, (480, 640, 3))
    im = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    im.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _via_device(data, resize_at):
    d = decode_for_device(data, CFG.min_size_test, CFG.max_size_test, resize_at)
    flat = torch.from_numpy(d.pixels.reshape(-1).copy())
    return d, device_batch(flat, [d.pixels.shape[:2]], [d.resized], CFG.pixel_mean, CFG.pixel_std, 32)


@pytest.mark.parametrize("size, orientation", [((640, 480), None), ((300, 200), 6), ((1333, 800), None),
                                               ((2000, 1500), 8)])
def test_uint8_feed_matches_the_official_preprocessing(size, orientation):
    data = _noisy_jpeg(size, orientation)
    ref = Preprocessor(CFG)([data])
    std = torch.tensor(CFG.pixel_std)[:, None, None]
    for resize_at in ResizeAt:
        d, batch = _via_device(data, resize_at)
        assert [d.resized] == ref.image_sizes and [d.original] == ref.original_sizes
        assert batch.shape == ref.images.shape
        grey = ((batch - ref.images) * std).abs()          # in grey levels
        if resize_at is ResizeAt.CPU:
            assert torch.equal(batch, ref.images)           # bit-identical
        else:                                               # PIL's integer bilinear vs float
            assert grey.max() <= 2.0 + 1e-3 and grey.mean() <= 0.15
            assert d.pixels.shape[:2] == (d.original if size != (1333, 800) else d.resized)


def test_reduced_jpeg_decoding_stays_close_to_the_official_resize():
    # 2400x1800 -> 1067x800: the JPEG decodes at 1/2 (1200x900), the device resizes the rest
    data = _noisy_jpeg((2400, 1800))
    ref = Preprocessor(CFG)([data])
    d, batch = _via_device(data, ResizeAt.DEVICE)
    assert d.pixels.shape[:2] == (900, 1200) and [d.original] == ref.original_sizes
    grey = ((batch - ref.images) * torch.tensor(CFG.pixel_std)[:, None, None]).abs()
    assert grey.mean() <= 1.5          # DCT scaling vs bilinear: differs on fine noise only


def test_device_batch_pads_with_zeros_after_normalising():
    pix = [np.full((40, 50, 3), 200, np.uint8), np.full((64, 30, 3), 10, np.uint8)]
    flat = torch.from_numpy(np.concatenate([p.reshape(-1) for p in pix]))
    out = device_batch(flat, [(40, 50), (64, 30)], [(40, 50), (64, 30)], CFG.pixel_mean, CFG.pixel_std, 32)
    ref = pad_batch([normalize(Image.fromarray(p), CFG.pixel_mean, CFG.pixel_std) for p in pix], 32)
    assert out.shape == (2, 3, 64, 64) and torch.equal(out, ref)
