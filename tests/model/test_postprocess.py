import math

import pytest
import torch

from model.box_ops import box_iou
from model.config import InferenceConfig
from model.postprocess import PostProcessor, classwise_nms, entity_scores

T = 6
# A 2x2 grid of 10x10-pixel anchors, (y, x) row-major like the head's outputs.
ANCHORS = torch.tensor([[0.0, 0, 9, 9], [20, 0, 29, 9], [0, 20, 9, 29], [20, 20, 29, 29]])
# entity 0 = tokens {1, 2}, entity 1 = tokens {2, 3}, entity 2 = token {4}
PMAP = torch.zeros(3, T)
PMAP[0, [1, 2]] = 1
PMAP[1, [2, 3]] = 1
PMAP[2, 4] = 1


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def outputs(logits, centerness, regression=None, image_sizes=((40, 40),)):
    """logits [B, 4, T]; centerness [B, 4] -> a one-level network output dict."""
    b = logits.shape[0]
    regression = torch.zeros(b, 4, 2, 2) if regression is None else regression
    return {"token_logits": [logits], "box_regression": [regression],
            "centerness": [centerness.view(b, 1, 2, 2)], "anchors": [ANCHORS],
            "image_sizes": list(image_sizes)}


def test_entity_score_is_the_mean_of_its_tokens():
    probs = torch.rand(2, 5, T)
    scores = entity_scores(probs, PMAP.expand(2, 3, T))
    assert torch.allclose(scores[..., 0], probs[..., [1, 2]].mean(-1))
    assert torch.allclose(scores[..., 2], probs[..., 4])
    empty = entity_scores(probs, torch.zeros(2, 1, T))
    assert torch.equal(empty, torch.zeros(2, 5, 1))


def test_entity_whose_tokens_all_score_high_wins():
    logits = torch.full((1, 4, T), -20.0)
    logits[0, 0, [1, 2]] = 6.0          # entity 0 fully on; entity 1 half on
    logits[0, 0, 3] = -6.0
    ctr = torch.zeros(1, 4)
    (res,) = PostProcessor(InferenceConfig())(outputs(logits, ctr), PMAP)
    assert res["labels"].tolist() == [0, 1]                    # class-wise NMS keeps both
    p_hi, p_lo = torch.sigmoid(torch.tensor(6.0)), torch.sigmoid(torch.tensor(-6.0))
    assert res["scores"][0].item() == pytest.approx(math.sqrt(p_hi * 0.5), rel=1e-5)
    assert res["scores"][1].item() == pytest.approx(math.sqrt((p_hi + p_lo) / 2 * 0.5), rel=1e-5)
    assert torch.equal(res["boxes"], ANCHORS[[0, 0]])            # zero regression = the anchor


def test_threshold_applies_before_centerness():
    logits = torch.full((1, 4, T), -20.0)
    logits[0, 1, 4] = logit(0.06)        # above 0.05, but its centerness is tiny
    logits[0, 2, 4] = logit(0.04)        # below 0.05, its centerness is ~1
    ctr = torch.tensor([[0.0, -6.0, 10.0, 0.0]])
    (res,) = PostProcessor(InferenceConfig())(outputs(logits, ctr), PMAP)
    assert res["labels"].tolist() == [2]
    assert torch.equal(res["boxes"], ANCHORS[[1]])
    expected = math.sqrt(0.06 * torch.sigmoid(torch.tensor(-6.0)).item())
    assert res["scores"].item() == pytest.approx(expected, rel=1e-4)
    assert res["scores"].item() < 0.05


def test_nothing_above_threshold_gives_empty_results():
    logits = torch.full((2, 4, T), -20.0)
    res = PostProcessor(InferenceConfig())(outputs(logits, torch.zeros(2, 4), image_sizes=[(40, 40)] * 2), PMAP)
    for r in res:
        assert r["boxes"].shape == (0, 4) and r["scores"].shape == (0,) and r["labels"].dtype == torch.long


def test_classwise_nms_uses_the_legacy_iou():
    # 5x5-pixel boxes shifted by one pixel: legacy IoU 20/30 > 0.6, continuous IoU 12/20 = 0.6
    boxes = torch.tensor([[0.0, 0, 4, 4], [1, 0, 5, 4]])
    assert box_iou(boxes[:1], boxes[1:]).item() == pytest.approx(2 / 3)
    scores = torch.tensor([0.9, 0.8])
    assert classwise_nms(boxes, scores, torch.tensor([0, 0]), 0.6).tolist() == [0]
    assert classwise_nms(boxes, scores, torch.tensor([0, 1]), 0.6).tolist() == [0, 1]
    assert classwise_nms(boxes, scores.flip(0), torch.tensor([3, 3]), 0.6).tolist() == [1]


def test_boxes_are_decoded_and_clipped_to_the_unpadded_image():
    logits = torch.full((1, 4, T), -20.0)
    logits[0, 3, 4] = 5.0
    regression = torch.zeros(1, 4, 2, 2)
    regression[0, :, 1, 1] = torch.tensor([10.0, 0.0, 5.0, 0.0])   # +1 width to the right, e x wider
    (res,) = PostProcessor(InferenceConfig())(outputs(logits, torch.zeros(1, 4), regression,
                                                      image_sizes=[(28, 35)]), PMAP)
    w = math.e * 10
    ctr = 24.5 + 10
    assert res["boxes"].tolist() == [[pytest.approx(ctr - 0.5 * (w - 1), rel=1e-5), 20.0, 34.0, 27.0]]


def test_top_k_per_level_and_per_image():
    logits = torch.full((1, 4, T), -20.0)
    logits[0, :, 4] = torch.tensor([1.0, 2.0, 3.0, 4.0])        # four separate boxes, entity 2
    ctr = torch.zeros(1, 4)
    res = PostProcessor(InferenceConfig(pre_nms_top_n=3))(outputs(logits, ctr), PMAP)[0]
    assert res["boxes"].tolist() == ANCHORS[[3, 2, 1]].tolist()
    res = PostProcessor(InferenceConfig(detections_per_image=2))(outputs(logits, ctr), PMAP)[0]
    assert res["boxes"].tolist() == ANCHORS[[3, 2]].tolist()
    logits[0, :, 4] = 2.0                                            # ties at the cut are all kept
    res = PostProcessor(InferenceConfig(detections_per_image=2))(outputs(logits, ctr), PMAP)[0]
    assert len(res["scores"]) == 4


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(0)
    levels = [(4, 5), (2, 3)]
    anchors = [torch.rand(h * w, 2, generator=g).mul(50).repeat(1, 2) + torch.tensor([0.0, 0, 12, 9])
               for h, w in levels]
    net = {"token_logits": [torch.randn(2, h * w, T, generator=g) * 3 - 1 for h, w in levels],
           "box_regression": [torch.randn(2, 4, h, w, generator=g) for h, w in levels],
           "centerness": [torch.randn(2, 1, h, w, generator=g) for h, w in levels],
           "anchors": anchors, "image_sizes": [(60, 64), (50, 40)]}
    maps = [PMAP, PMAP[[2, 0]]]
    post = PostProcessor(InferenceConfig(pre_nms_top_n=7, detections_per_image=9))
    batched = post(net, maps)
    assert sum(len(r["scores"]) for r in batched) > 4
    for i in range(2):
        single = {k: [x[i:i + 1] for x in v] if k != "anchors" and k != "image_sizes" else v
                  for k, v in net.items()}
        (one,) = post(single, maps[i], image_sizes=[net["image_sizes"][i]])
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(batched[i][key], one[key]), key
        assert torch.all(one["scores"][:-1] >= one["scores"][1:])
        h, w = net["image_sizes"][i]
        assert one["boxes"][:, 2].max() <= w - 1 and one["boxes"][:, 3].max() <= h - 1
