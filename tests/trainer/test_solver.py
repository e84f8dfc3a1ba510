"""The official solver pieces (trainer/solver.py): AdamW parameter groups, the warmup + step
schedule, EMA, and our per-prefix lr multipliers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.config import ConfigError
from trainer.solver import ModelEma, lr_factor, lr_multiplier, make_optimizer, milestones, param_groups
from trainer.config import TrainConfig, load_train_config


@pytest.fixture(scope="module")
def tiny_random():
    """A `tiny` GLIP with random weights (fast to build)."""
    from model.config import load_model_config
    from model.glip import build_glip
    torch.manual_seed(0)
    return build_glip(load_model_config("tiny"), load_weights=False)


def test_param_groups_follow_the_official_rules(tiny_random):
    cfg = TrainConfig(output="x", lr=0.01, lang_lr=0.001, weight_decay=0.05)
    model = tiny_random
    for p in model.backbone.parameters():                 # frozen tensors are left out
        p.requires_grad_(False)
    try:
        groups = param_groups(model, cfg)
        by_name = {n: g for g in groups for n in g["names"]}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(by_name) == trainable and sum(len(g["names"]) for g in groups) == len(trainable)
        assert not any(n.startswith("backbone.") for n in by_name)
        assert [g["group"] for g in groups] == ["base", "base_bias", "language", "language_bias"]
        expect = {"base": (0.01, 0.05), "base_bias": (0.02, 0.0), "language": (0.001, 0.05),
                  "language_bias": (0.002, 0.0)}
        for name, group in by_name.items():
            language, bias = name.startswith("language."), "bias" in name
            key = ("language" if language else "base") + ("_bias" if bias else "")
            assert group["group"] == key, name
            assert (group["lr"], group["weight_decay"]) == pytest.approx(expect[key]), name
        # the official rule is a substring match: the head's bias_lang / bias0 count as biases,
        # the head's own BERT layers are not the language backbone
        assert by_name["head.bias_lang"]["group"] == by_name["head.bias0"]["group"] == "base_bias"
        assert any(n.startswith("head.blocks.0.text_layer.") and by_name[n]["group"] == "base"
                   for n in by_name)
        assert by_name["language.model.embeddings.LayerNorm.weight"]["group"] == "language"
        optimizer = make_optimizer(groups)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.02, 0.001, 0.002])
    finally:
        for p in model.backbone.parameters():
            p.requires_grad_(True)


def test_lr_schedule_warmup_then_steps():
    cfg = TrainConfig(output="x", max_iter=10000, warmup_iters=2000, warmup_factor=0.001, steps=(0.67, 0.89))
    assert milestones(cfg) == [6700, 8900]
    expected = {0: 0.001, 1: 0.001 * (1 - 1 / 2000) + 1 / 2000, 1000: 0.5005, 1999: 0.001 * (1 / 2000) + 1999 / 2000,
                2000: 1.0, 6699: 1.0, 6700: 0.1, 8899: 0.1, 8900: 0.01, 9999: 0.01}
    for step, factor in expected.items():
        assert lr_factor(step, cfg) == pytest.approx(factor, rel=1e-12), step
    short = TrainConfig(output="x", max_iter=12, warmup_iters=0, steps=(0.5,), gamma=0.5)
    assert [lr_factor(s, short) for s in (0, 5, 6, 11)] == [1.0, 1.0, 0.5, 0.5]


def test_ema_is_the_official_moving_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    assert torch.allclose(ema.state["0.weight"], 0.9 * start["0.weight"] + 0.1 * (start["0.weight"] + 1))
    assert torch.equal(ema.state["0.bias"], start["0.bias"])
    assert int(ema.state["1.num_batches_tracked"]) == 7           # integer buffers are copied
    other = ModelEma(model, 0.9)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.state[k], ema.state[k]) for k in ema.state)


def test_lr_multipliers_give_prefixed_tensors_their_own_groups(tiny_random):
    cfg = TrainConfig(output="x", lr=0.01, lang_lr=0.001,
                      lr_multipliers={"head.bbox_pred": 10.0, "head": 2.0, "language.model.encoder": 0.0})
    groups = param_groups(tiny_random, cfg)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == {n for n, p in tiny_random.named_parameters() if p.requires_grad}
    # the longest prefix wins; biases keep the bias factor on top of the multiplier
    assert by_name["head.bbox_pred.weight"]["group"] == "base@head.bbox_pred"
    assert by_name["head.bbox_pred.weight"]["lr"] == pytest.approx(0.1)
    assert by_name["head.bbox_pred.bias"]["lr"] == pytest.approx(0.2)
    assert by_name["head.centerness.weight"]["group"] == "base@head"
    assert by_name["head.centerness.weight"]["lr"] == pytest.approx(0.02)
    fpn = [n for n in by_name if n.startswith("backbone.fpn.") and "bias" not in n]
    assert fpn and all(by_name[n]["group"] == "base" and by_name[n]["lr"] == pytest.approx(0.01) for n in fpn)
    frozen = [n for n in by_name if n.startswith("language.model.encoder.")]
    assert frozen and all(by_name[n]["lr"] == 0.0 for n in frozen)
    assert lr_multiplier("head.scales.0.scale", cfg.lr_multipliers) == ("head", 2.0)
    assert lr_multiplier("fpn.x", cfg.lr_multipliers) == ("", 1.0)
    # the schedule scales every group alike, from its own base
    optimizer = make_optimizer(groups)
    assert {g["group"] for g in optimizer.param_groups} >= {"base", "base@head", "base@head.bbox_pred"}


def test_lr_multipliers_errors_name_the_prefix(tiny_random):
    with pytest.raises(ValueError, match=r"no trainable parameter name starts with \['head.bbox'\]"):
        param_groups(tiny_random, TrainConfig(output="x", lr_multipliers={"head.bbox": 10.0, "head.bbox_pred": 1.0}))
    with pytest.raises(ConfigError, match="lr_multipliers"):
        load_train_config(None, ["output=x", "lr_multipliers={head.bbox_pred: -1}"])
