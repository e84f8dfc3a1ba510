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
