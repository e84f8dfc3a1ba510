"""The official GLIP solver pieces: AdamW parameter groups, the warmup + multi-step schedule, EMA.

The official solver (docs/model.md §1): one group per kind of tensor — base
LR, ``language.*`` at LANG_LR, any name containing "bias" at LR x BIAS_LR_FACTOR with
WEIGHT_DECAY_BIAS; linear warmup from WARMUP_FACTOR over WARMUP_ITERS; x GAMMA at each milestone
(fractions of max_iter); ModelEma as the official ``utils/ema.py``.
"""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from trainer.config import TrainConfig

_GROUP_ORDER = ("base", "base_bias", "language", "language_bias")


def lr_multiplier(name: str, multipliers: dict[str, float]) -> tuple[str, float]:
    """The (prefix, factor) of ``cfg.lr_multipliers`` that applies to tensor ``name``: the longest
    matching prefix, or ("", 1.0)."""
    best = max((p for p in multipliers if name.startswith(p)), key=len, default="")
    return best, (multipliers[best] if best else 1.0)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups by the official rules; each group also lists its tensors' ``names``.

    Tensors under a prefix of ``cfg.lr_multipliers`` (ours, not official) get their own groups
    ("base@head.bbox_pred", ...) whose lr is multiplied by that factor.
    """
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("module.")
        language = name.startswith("language.")
        bias = "bias" in name
        lr = cfg.lang_lr if language else cfg.lr
        wd = cfg.weight_decay
        if bias:
            lr, wd = lr * cfg.bias_lr_factor, cfg.bias_weight_decay
        key = ("language" if language else "base") + ("_bias" if bias else "")
        prefix, factor = lr_multiplier(name, cfg.lr_multipliers)
        if prefix:
            key, lr = f"{key}@{prefix}", lr * factor
        group = groups.setdefault(key, {"group": key, "params": [], "names": [], "lr": lr, "base_lr": lr,
                                        "weight_decay": wd})
        group["params"].append(p)
        group["names"].append(name)
    unused = sorted(set(cfg.lr_multipliers) - {g["group"].split("@")[1] for g in groups.values() if "@" in g["group"]})
    if unused:
        raise ValueError(f"lr_multipliers: no trainable parameter name starts with {unused}; the head's "
                         "predictors are head.bbox_pred, head.centerness, head.scales")
    order = {k: i for i, k in enumerate(_GROUP_ORDER)}
    return sorted(groups.values(), key=lambda g: (order[g["group"].split("@")[0]], g["group"]))


def milestones(cfg: TrainConfig) -> list[int]:
    return [round(f * cfg.max_iter) for f in cfg.steps]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The multiplier of every group's base lr for the update after ``step`` updates."""
    warmup = 1.0
    if step < cfg.warmup_iters:
        alpha = step / cfg.warmup_iters
        warmup = cfg.warmup_factor * (1 - alpha) + alpha
    return warmup * cfg.gamma ** bisect.bisect_right(milestones(cfg), step)


def make_optimizer(groups: list[dict]) -> torch.optim.AdamW:
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, fused=fused)


class ModelEma:
    """Exponential moving average of a model's state dict (official ``ModelEma``)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for key, ema in self.state.items():
            value = current[key].detach()
            if ema.is_floating_point():
                ema.lerp_(value.to(ema.dtype), 1.0 - self.decay)
            else:
                ema.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "state": {k: v.cpu() for k, v in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state["state"].items():
            self.state[key].copy_(value)
