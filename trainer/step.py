"""One update of the student trainer (official ``do_train`` inner step), plain PyTorch.

``train_step``: batches where more than ``max_empty_fraction`` of the images (or all) have no
box are skipped (official MAX_NEG_PER_BATCH); forward under autocast (``precision``), the
criterion in float32, a non-finite total loss skips the update on every worker (the official
zeroes NaN/Inf loss entries instead; with DDP a partial graph would stall the gradient
all-reduce, so the whole step goes), GradScaler for fp16, full-model L2 clipping after
unscaling, AdamW step, EMA update (official ModelEma: ``ema = d * ema + (1 - d) * model`` on
every float entry of the state dict, integer buffers copied).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from core.device import Precision, autocast
from trainer.solver import ModelEma, lr_factor

if TYPE_CHECKING:
    from trainer.config import TrainConfig

__all__ = ["Precision", "StepStatus", "StepResult", "train_step", "distributed", "TARGET_KEYS"]

# what the criterion reads of a batch's targets (collate's output)
TARGET_KEYS = ("boxes", "positive_map", "ignore_tokens")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _agree(flag: bool, device: torch.device, op) -> bool:
    """A flag agreed on by every worker (op MAX: any, MIN: all)."""
    if not distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=op)
    return bool(t.item() > 0.5)


class StepStatus(str, enum.Enum):
    OK = "ok"
    SKIPPED_EMPTY = "skipped_empty"          # too many images without boxes (on some worker)
    SKIPPED_NONFINITE = "skipped_nonfinite"  # NaN/Inf loss (on some worker): no update


@dataclass
class StepResult:
    status: StepStatus
    losses: dict[str, float] = field(default_factory=dict)
    loss: float = float("nan")
    grad_norm: float = float("nan")
    lr: float = float("nan")
    images: int = 0
    overflow: bool = False        # fp16: inf/NaN gradients, GradScaler skipped the update (step counts)


def train_step(model: nn.Module, criterion, optimizer: torch.optim.Optimizer, batch: dict, *, step: int,
               cfg: TrainConfig, device: torch.device, scaler=None, ema: ModelEma | None = None,
               ema_source: nn.Module | None = None) -> StepResult:
    """One update of ``model`` (maybe DDP-wrapped) on ``batch`` (``TrainStream`` output); ``step``
    is the number of updates done so far (sets the lr). ``ema_source`` is the unwrapped model."""
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items() if k in TARGET_KEYS}
               for t in batch["targets"]]
    n = len(targets)
    empty = sum(int(t["boxes"].shape[0] == 0) for t in targets)
    if _agree(empty == n or empty > cfg.max_empty_fraction * n, device, dist.ReduceOp.MAX):
        return StepResult(StepStatus.SKIPPED_EMPTY, images=n)

    factor = lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    images = batch["images"].to(device, non_blocking=True)
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["attention_mask"].to(device, non_blocking=True)
    with autocast(device, cfg.precision):
        outputs = model(images, batch["image_sizes"], input_ids, mask)
    losses = criterion(outputs, targets, mask)
    total = criterion.total(losses)
    values = {k: float(v.detach()) for k, v in losses.items()}
    optimizer.zero_grad(set_to_none=True)
    if not _agree(bool(torch.isfinite(total.detach())), device, dist.ReduceOp.MIN):
        return StepResult(StepStatus.SKIPPED_NONFINITE, values, float(total.detach()), images=n,
                          lr=cfg.lr * factor)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
    overflow = False
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        overflow = scaler.get_scale() < scale
    else:
        optimizer.step()
    if ema is not None:
        ema.update(ema_source if ema_source is not None else model)
    return StepResult(StepStatus.OK, values, float(total.detach()), float(grad_norm), cfg.lr * factor, n,
                      overflow)
