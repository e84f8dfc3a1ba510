import math

import pytest
import torch
from torchvision.ops import box_iou as tv_box_iou

from model import box_ops
from model.box_ops import BoxCoder


def random_boxes(n: int, seed: int = 0, max_xy: float = 600.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * max_xy
    wh = torch.rand(n, 2, generator=g) * 200 + 2
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_of_decode_is_identity():
    anchors = random_boxes(50, seed=1)
    g = torch.Generator().manual_seed(2)
    deltas = torch.randn(50, 4, generator=g)           # |dw/5| far below the log(1000/16) clamp
    coder = BoxCoder()
    assert torch.allclose(coder.encode(coder.decode(deltas, anchors), anchors), deltas, atol=1e-4)


def test_decode_of_encode_is_identity():
    anchors, boxes = random_boxes(50, seed=3), random_boxes(50, seed=4)
    coder = BoxCoder()
    assert torch.allclose(coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-3)


def test_zero_deltas_give_the_anchor_and_legacy_widths():
    anchors = torch.tensor([[-28.0, -28.0, 35.0, 35.0], [0.0, 0.0, 9.0, 19.0]])
    coder = BoxCoder()
    assert torch.equal(coder.decode(torch.zeros(2, 4), anchors), anchors)
    # dx = 10 * (gt_ctr - anchor_ctr) / (x2 - x1 + 1): shifting a 10-px-wide box by 1 px -> dx = 1
    shifted = anchors[1:] + torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert torch.allclose(coder.encode(shifted, anchors[1:]), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_decode_clamps_dw_dh_and_handles_several_boxes_per_row():
    anchors = torch.tensor([[0.0, 0.0, 15.0, 15.0]])
    deltas = torch.tensor([[0.0, 0.0, 100.0, 100.0, 0.0, 0.0, 0.0, 0.0]])
    out = BoxCoder().decode(deltas, anchors)
    w = out[0, 2] - out[0, 0] + 1
    assert w.item() == pytest.approx(16 * 1000 / 16, rel=1e-5)        # exp(log(1000/16)) * 16
    assert torch.equal(out[0, 4:], anchors[0])


def test_legacy_iou_matches_torchvision_on_plus_one_boxes():
    a, b = random_boxes(20, seed=5), random_boxes(30, seed=6)
    shift = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert torch.allclose(box_ops.box_iou(a, b), tv_box_iou(a + shift, b + shift), atol=1e-6)
    # Two 10x10-pixel boxes overlapping by 5 columns: 50 / 150.
    iou = box_ops.box_iou(torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([[5.0, 0, 14, 9]]))
    assert iou.item() == pytest.approx(1 / 3)
    assert box_ops.box_iou(torch.zeros(0, 4), b).shape == (0, 30)


def test_elementwise_giou_official_form():
    boxes = random_boxes(10, seed=7)
    same = box_ops.elementwise_giou(boxes, boxes)
    assert torch.allclose(same, torch.ones(10), atol=1e-6)
    other = random_boxes(10, seed=8)
    diag = box_ops.generalized_box_iou(boxes, other).diagonal()
    assert torch.allclose(box_ops.elementwise_giou(boxes, other), diag, atol=1e-5)
    # disjoint boxes: IoU 0, GIoU = -(enclosing - union) / enclosing
    g = box_ops.elementwise_giou(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[20.0, 0, 30, 10]]))
    assert g.item() == pytest.approx(-(300 - 200) / 300, abs=1e-6)
    # an inverted prediction becomes a zero-width box at x1 (official max(x1, x2)): here the
    # segment x=10 on the target's edge -> IoU 0, enclosing == union -> GIoU 0
    inv = box_ops.elementwise_giou(torch.tensor([[10.0, 0, 0, 10]]), torch.tensor([[0.0, 0, 10, 10]]))
    assert inv.item() == pytest.approx(0.0, abs=1e-6)


def test_xywh_round_trips():
    boxes = random_boxes(10, seed=9)
    for convention in box_ops.BoxConvention:
        xywh = box_ops.xyxy_to_xywh(boxes, convention)
        assert torch.allclose(box_ops.xywh_to_xyxy(xywh, convention), boxes)
    assert box_ops.xywh_to_xyxy(torch.tensor([10.0, 20, 5, 5])).tolist() == [10, 20, 14, 24]
    assert box_ops.xywh_to_xyxy(torch.tensor([10.0, 20, 5, 5]), "continuous").tolist() == [10, 20, 15, 25]


def test_the_readers_and_the_model_share_one_convention():
    from stages.readers import common
    assert common.BoxConvention is box_ops.BoxConvention
    xywh = [10.0, 20.0, 5.0, 5.0]
    for convention in box_ops.BoxConvention:
        assert common.xywh_to_xyxy(xywh, convention) == box_ops.xywh_to_xyxy(torch.tensor(xywh), convention).tolist()


def test_clip_to_image_is_legacy():
    boxes = torch.tensor([[-5.0, -5.0, 700.0, 500.0], [10.0, 10.0, 20.0, 20.0]])
    out = box_ops.clip_boxes(boxes, (480, 640))
    assert out.tolist() == [[0, 0, 639, 479], [10, 10, 20, 20]]


def test_rescale_boxes():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert box_ops.rescale_boxes(boxes, (100, 200), (200, 400)).tolist() == [[20, 40, 60, 80]]
    assert box_ops.rescale_boxes(boxes, (100, 200), (50, 400)).tolist() == [[20, 10, 60, 20]]
    back = box_ops.rescale_boxes(box_ops.rescale_boxes(boxes, (480, 640), (800, 1066)), (800, 1066), (480, 640))
    assert torch.allclose(back, boxes, atol=1e-4)


def test_clip_constant():
    assert box_ops.BBOX_XFORM_CLIP == pytest.approx(math.log(1000 / 16))
