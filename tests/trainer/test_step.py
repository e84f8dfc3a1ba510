"""Loss groups of one training step (``trainer.step``): a source with a ``loss_weight`` is
normalised by its own positives and weighted, and the rest of the batch keeps exactly the loss it
has without that source."""
from __future__ import annotations

import pytest
import torch

from model.config import LossConfig
from model.criterion import GLIPCriterion
from trainer.step import _grouped_losses, loss_groups, select_images

TOKENS = 6


def grid_anchors(n=3, size=10.0, stride=10.0):
    ys, xs = torch.meshgrid(torch.arange(n) * stride, torch.arange(n) * stride, indexing="ij")
    xs, ys = xs.reshape(-1).float(), ys.reshape(-1).float()
    return torch.stack([xs, ys, xs + size - 1, ys + size - 1], dim=1)


def batch(b: int, seed: int = 0):
    """Random one-level outputs over a 3 x 3 anchor grid (requiring grad) and per-image targets
    with 1..3 boxes each equal to an anchor, so positives differ between images."""
    g = torch.Generator().manual_seed(seed)
    outputs = {"token_logits": [(torch.randn(b, 9, TOKENS, generator=g) * 2).requires_grad_()],
               "box_regression": [torch.randn(b, 4, 3, 3, generator=g).requires_grad_()],
               "centerness": [torch.randn(b, 1, 3, 3, generator=g).requires_grad_()],
               "anchors": [grid_anchors()]}
    anchors = grid_anchors()
    targets = []
    for i in range(b):
        k = 1 + i % 3
        which = torch.randperm(9, generator=g)[:k]
        pm = torch.zeros(k, TOKENS)
        pm[torch.arange(k), 1 + torch.randint(0, TOKENS - 2, (k,), generator=g)] = 1
        targets.append({"boxes": anchors[which].clone(), "positive_map": pm})
    mask = torch.ones(b, TOKENS, dtype=torch.long)
    return outputs, targets, mask


def test_loss_groups_split_by_source_and_leave_out_empty_ones():
    assert loss_groups(["a", "b", "p", "a"], {}, 4) == [("", 1.0, [0, 1, 2, 3])]
    assert loss_groups(None, {"p": 0.5}, 3) == [("", 1.0, [0, 1, 2])]
    assert loss_groups(["a", "p", "b", "p"], {"p": 0.5}, 4) == [("", 1.0, [0, 2]), ("p", 0.5, [1, 3])]
    assert loss_groups(["a", "b"], {"p": 0.5}, 2) == [("", 1.0, [0, 1])]
    assert loss_groups(["p", "q"], {"p": 2.0, "q": 0.0}, 2) == [("p", 2.0, [0]), ("q", 0.0, [1])]
    with pytest.raises(ValueError, match="names 2 images, the batch has 3"):
        loss_groups(["a", "p"], {"p": 1.0}, 3)


def test_select_images_keeps_the_chosen_images_and_the_anchors():
    outputs, _, _ = batch(4)
    picked = select_images(outputs, [3, 1])
    for key in ("token_logits", "box_regression", "centerness"):
        assert torch.equal(picked[key][0], outputs[key][0][[3, 1]])
    assert picked["anchors"] is outputs["anchors"]


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_grouped_total_is_the_rest_alone_plus_the_weighted_group(weight):
    criterion = GLIPCriterion(LossConfig())
    outputs, targets, mask = batch(5)
    groups = loss_groups(["g", "p", "g", "g", "p"], {"p": weight}, 5)
    total, named = _grouped_losses(criterion, outputs, targets, mask, groups)

    rest, pseudo = [0, 2, 3], [1, 4]
    alone = criterion(select_images(outputs, rest), [targets[i] for i in rest], mask[rest])
    group = criterion(select_images(outputs, pseudo), [targets[i] for i in pseudo], mask[pseudo])
    assert set(named) == {*alone, *(f"p/{k}" for k in group)}
    assert all(torch.equal(named[k], v) for k, v in alone.items())
    assert torch.allclose(total, criterion.total(alone) + weight * criterion.total(group))
    # unlike the shared loss, where the pseudo images' positives dilute the others'
    shared = criterion.total(criterion(outputs, targets, mask))
    assert not torch.allclose(shared, criterion.total(alone) + weight * criterion.total(group))

    # the gradient reaching the rest's images is exactly that of the batch without the group
    total.backward()
    grad = outputs["token_logits"][0].grad.clone()
    fresh, _, _ = batch(5)
    criterion.total(criterion(select_images(fresh, rest), [targets[i] for i in rest], mask[rest])).backward()
    assert torch.allclose(grad[rest], fresh["token_logits"][0].grad[rest])
    assert (grad[pseudo].abs().sum() > 0) == (weight > 0)


def test_one_group_is_the_plain_criterion():
    criterion = GLIPCriterion(LossConfig())
    outputs, targets, mask = batch(3)
    total, named = _grouped_losses(criterion, outputs, targets, mask, [("", 1.0, [0, 1, 2])])
    plain = criterion(outputs, targets, mask)
    assert set(named) == set(plain) and torch.equal(total, criterion.total(plain))
