"""One update of the student trainer (official ``do_train`` inner step), plain PyTorch.

``train_step``: batches where more than ``max_empty_fraction`` of the images (or all) have no
box are skipped (official MAX_NEG_PER_BATCH); forward under autocast (``precision``), the
criterion in float32, a non-finite total loss skips the update on every worker (the official
zeroes NaN/Inf loss entries instead; with DDP a partial graph would stall the gradient
all-reduce, so the whole step goes), GradScaler for fp16, full-model L2 clipping after
unscaling, AdamW step, EMA update (official ModelEma: ``ema = d * ema + (1 - d) * model`` on
every float entry of the state dict, integer buffers copied).

A source with a ``loss_weight`` (``data.sources.NAME.loss_weight``, extra_per_batch sources) is a
loss group of its own: ``loss_groups`` splits the batch's images by source, the criterion runs
once per group on that group's images (``select_images``), each group normalised by its own
positives, and the total is the rest's total + sum of loss_weight x the group's total. So the
other images' loss is exactly that of the same batch without the group (semi-supervised
detection's supervised + weighted unsupervised loss); the group's named losses are logged as
``NAME/loss_token``, ... beside the others.
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

__all__ = ["Precision", "StepStatus", "StepResult", "train_step", "distributed", "TARGET_KEYS", "loss_groups",
           "select_images"]

# what the criterion reads of a batch's targets (collate's output)
TARGET_KEYS = ("boxes", "positive_map", "ignore_tokens", "ignore_regions", "box_loss")


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


def loss_groups(sources: list[str] | None, weights: dict[str, float], n: int) -> list[tuple[str, float, list[int]]]:
    """The batch's loss groups: [(name, weight, image indices)], the images of the sources in
    ``weights`` (source name -> loss weight) each a group of their own, the rest first as
    ("", 1.0, ...). ``sources``: the source of each of the ``n`` images (None: all the rest).
    Empty groups are left out."""
    if not weights or sources is None:
        return [("", 1.0, list(range(n)))]
    if len(sources) != n:
        raise ValueError(f"batch['sources'] names {len(sources)} images, the batch has {n}")
    rest = [i for i, s in enumerate(sources) if s not in weights]
    groups = [("", 1.0, rest)] if rest else []
    groups += [(name, float(w), [i for i, s in enumerate(sources) if s == name]) for name, w in weights.items()]
    return [g for g in groups if g[2]]


def select_images(outputs: dict, index: list[int]) -> dict:
    """The network's output dict restricted to the images ``index`` (the per-image entries the
    criterion reads: ``token_logits``, ``box_regression``, ``centerness``; ``anchors`` are shared)."""
    idx = torch.as_tensor(index, dtype=torch.long, device=outputs["token_logits"][0].device)
    picked = {k: [v.index_select(0, idx) for v in outputs[k]]
              for k in ("token_logits", "box_regression", "centerness")}
    return {**picked, "anchors": outputs["anchors"]}


def _grouped_losses(criterion, outputs: dict, targets: list, mask: torch.Tensor,
                    groups: list[tuple[str, float, list[int]]]) -> tuple[torch.Tensor, dict]:
    """The weighted total over ``groups`` and every group's named losses: the rest's (group "")
    under their own names, a source's as ``name/loss_*``."""
    if len(groups) == 1 and groups[0][0] == "":
        losses = criterion(outputs, targets, mask)
        return criterion.total(losses), losses
    total, named = None, {}
    for name, weight, index in groups:
        sub = criterion(select_images(outputs, index), [targets[i] for i in index], mask[index])
        part = criterion.total(sub) * weight
        total = part if total is None else total + part
        named.update({(f"{name}/{k}" if name else k): v for k, v in sub.items()})
    return total, named


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
    weights = {name: s.loss_weight for name, s in cfg.data.sources.items() if s.loss_weight is not None}
    total, losses = _grouped_losses(criterion, outputs, targets, mask, loss_groups(batch.get("sources"), weights, n))
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
