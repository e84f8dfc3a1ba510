import math

import pytest
import torch

from model.anchors import AnchorGenerator
from model.atss import atss_assign, atss_assign_single, pad_boxes
from model.box_ops import box_iou
from model.config import AnchorConfig


def grid_anchors(n: int, size: float, stride: float, offset: float = 0.0) -> torch.Tensor:
    """An n x n grid of square anchors [x, y, x + size - 1, y + size - 1], (y, x) row-major."""
    ys, xs = torch.meshgrid(torch.arange(n) * stride + offset, torch.arange(n) * stride + offset, indexing="ij")
    xs, ys = xs.reshape(-1).float(), ys.reshape(-1).float()
    return torch.stack([xs, ys, xs + size - 1, ys + size - 1], dim=1)


def pyramid(height: int, width: int) -> list[torch.Tensor]:
    """The official anchors (docs/model.md §5) of an image of (height, width)."""
    gen = AnchorGenerator(AnchorConfig())
    feats = [torch.zeros(1, 1, math.ceil(height / s), math.ceil(width / s)) for s in gen.strides]
    return gen(feats)


def reference_assign(anchors, gt, topk=9):
    """Spec §6 written as plain loops, one box at a time (no batching, no scatter)."""
    all_anchors = torch.cat(anchors)
    n = all_anchors.shape[0]
    ctr = (all_anchors[:, :2] + all_anchors[:, 2:]) / 2
    ious = box_iou(all_anchors, gt) if len(gt) else torch.zeros(n, 0)
    best = torch.full((n,), -math.inf)
    matched = torch.full((n,), -1, dtype=torch.long)
    for g in range(len(gt)):
        g_ctr = (gt[g, :2] + gt[g, 2:]) / 2
        dist = ((ctr - g_ctr) ** 2).sum(-1).sqrt()
        cands, start = [], 0
        for level in anchors:
            k = min(topk, len(level))
            order = sorted(range(len(level)), key=lambda i: (float(dist[start + i]), i))
            cands += [start + i for i in order[:k]]
            start += len(level)
        vals = ious[cands, g]
        thr = vals.mean() + vals.std()
        for a, v in zip(cands, vals.tolist()):
            l, t = ctr[a, 0] - gt[g, 0], ctr[a, 1] - gt[g, 1]
            r, b = gt[g, 2] - ctr[a, 0], gt[g, 3] - ctr[a, 1]
            if v >= thr and min(l, t, r, b) > 0.01 and v > best[a]:
                best[a], matched[a] = v, g
    return matched


def test_box_equal_to_an_isolated_anchor_takes_only_that_anchor():
    # 5x5 grid of non-overlapping 10 px anchors: the box equals anchor (y=2, x=2). Candidate IoUs
    # are 1 and eight 0s: threshold = 1/9 + 1/3, only the centre anchor passes.
    anchors = [grid_anchors(5, 10, 10)]
    matched = atss_assign_single(anchors, torch.tensor([[20.0, 20, 29, 29]]))
    expected = torch.full((25,), -1)
    expected[12] = 0
    assert torch.equal(matched, expected)


def test_official_pyramid_positives_are_the_3x3_block_on_p3():
    # 128x128 image, official anchors; the box is the P3 anchor at (x=7, y=7): [28, 28, 91, 91].
    anchors = pyramid(128, 128)
    gt = torch.tensor([[28.0, 28, 91, 91]])
    # Candidates by level and their legacy IoUs, by hand: P3 centre 1, 4 side neighbours
    # (56x64 overlap) 3584/4608 = 7/9, 4 diagonals 3136/5056 = 49/79; the 9 nearest P4, P5, P6
    # anchors and the single P7 anchor contain the box: 4096 / 128^2, / 256^2, / 512^2, / 1024^2.
    ious = torch.tensor([1.0] + [7 / 9] * 4 + [49 / 79] * 4
                        + [1 / 4] * 9 + [1 / 16] * 9 + [1 / 64] * 4 + [1 / 256])
    threshold = ious.mean() + ious.std()
    assert 0.25 < threshold < 49 / 79          # ~0.594: the whole 3x3 block, nothing else
    matched = atss_assign_single(anchors, gt)
    block = [y * 16 + x for y in (6, 7, 8) for x in (6, 7, 8)]
    assert sorted((matched >= 0).nonzero().squeeze(1).tolist()) == block
    assert (matched[block] == 0).all()


@pytest.mark.parametrize("x2, positive", [(4.0, False), (5.0, True), (4.505, False), (4.52, True)])
def test_positive_anchor_centre_must_lie_inside_the_box(x2, positive):
    # 3x3 non-overlapping 10 px anchors; a small box in the corner of anchor 0 (centre 4.5, 4.5).
    # Its IoU with anchor 0 is the only non-zero one (above the threshold), so anchor 0 is
    # positive exactly when min(l, t, r, b) = x2 - 4.5 > 0.01.
    anchors = [grid_anchors(3, 10, 10)]
    matched = atss_assign_single(anchors, torch.tensor([[0.0, 0, x2, x2]]))
    assert (matched[0] == 0).item() is positive
    assert (matched[1:] == -1).all()


def test_anchor_positive_for_two_boxes_goes_to_the_higher_iou():
    # Both boxes lie inside anchor 0 only: IoU 1 for [0,0,9,9], 64/100 for [0,0,7,7].
    anchors = [grid_anchors(3, 10, 10)]
    big, small = [0.0, 0, 9, 9], [0.0, 0, 7, 7]
    assert atss_assign_single(anchors, torch.tensor([big, small]))[0] == 0
    assert atss_assign_single(anchors, torch.tensor([small, big]))[0] == 1
    # and each box alone does take the anchor
    assert atss_assign_single(anchors, torch.tensor([small]))[0] == 0


def test_candidates_are_chosen_per_level():
    # Level A: 3x3 grid of 10 px anchors around the box; level B: a far-away grid. Every level
    # contributes topk candidates. topk=1: {A: anchor 4 (IoU 0.49), B: one 0} -> threshold
    # 0.245 + 0.346 = 0.59 > 0.49, nothing is positive. topk=2: {A: 0.49, 0; B: 0, 0} -> threshold
    # 0.1225 + 0.245 = 0.37, anchor 4 is positive (a global top-2 would give the topk=1 result).
    level_a = grid_anchors(3, 10, 10)
    level_b = grid_anchors(3, 10, 10, offset=500)
    gt = torch.tensor([[13.0, 13, 19, 19]])         # inside anchor 4 = [10,10,19,19]: IoU 49/100
    assert (atss_assign_single([level_a, level_b], gt, topk=1) == -1).all()
    matched = atss_assign_single([level_a, level_b], gt, topk=2)
    assert matched[4] == 0 and (matched >= 0).sum() == 1


def test_image_without_boxes_has_no_positives():
    anchors = pyramid(96, 128)
    n = sum(len(a) for a in anchors)
    assert torch.equal(atss_assign_single(anchors, torch.zeros(0, 4)), torch.full((n,), -1))
    boxes, valid = pad_boxes([torch.zeros(0, 4), torch.zeros(0, 4)])
    assert boxes.shape == (2, 0, 4)
    assert torch.equal(atss_assign(anchors, boxes, valid), torch.full((2, n), -1))


def random_boxes(g, height, width, gen):
    xy = torch.rand(g, 2, generator=gen) * torch.tensor([width * 0.7, height * 0.7])
    wh = 8 + torch.rand(g, 2, generator=gen) * torch.tensor([width * 0.6, height * 0.6])
    x2y2 = torch.minimum(xy + wh, torch.tensor([width - 1.0, height - 1.0]))
    return torch.cat([xy, x2y2], dim=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_assignment_equals_per_image_and_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    height, width = 160, 224
    anchors = pyramid(height, width)
    per_image = [random_boxes(g, height, width, gen) for g in (5, 0, 1, 12)]
    per_image.append(per_image[0][[3, 3, 1]])       # duplicate boxes: equal IoUs -> lowest index
    boxes, valid = pad_boxes(per_image)
    batched = atss_assign(anchors, boxes, valid)
    assert batched.shape == (len(per_image), sum(len(a) for a in anchors))
    for i, gt in enumerate(per_image):
        single = atss_assign_single(anchors, gt)
        assert torch.equal(batched[i], single)
        assert torch.equal(single, reference_assign(anchors, gt))
    assert (batched[1] == -1).all()
    assert (batched[0] >= 0).any() and (batched[3] >= 0).any()
    assert not (batched[4] == 1).any()               # box 1 duplicates box 0: index 1 never wins
    assert (batched[4] == 0).any() and (batched[4] == 2).any()


def test_padding_boxes_are_never_matched():
    anchors = pyramid(128, 128)
    gt = torch.tensor([[28.0, 28, 91, 91]])
    other = torch.tensor([[60.0, 4, 123, 67]])       # a real-looking box in the padding slot
    boxes = torch.stack([torch.cat([gt, other]), torch.cat([other, gt])])
    valid = torch.tensor([[True, False], [True, False]])
    matched = atss_assign(anchors, boxes, valid)
    assert torch.equal(matched[0], atss_assign_single(anchors, gt))
    assert torch.equal(matched[1], atss_assign_single(anchors, other))
    assert (matched <= 0).all()
    assert (atss_assign(anchors, boxes) == 1).any()  # the same slots, valid: they do take anchors
