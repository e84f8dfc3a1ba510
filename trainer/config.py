"""The trainer's config: every key of ``pipeline train``, read in one place.

``TrainConfig`` holds the model, its initialisation, the data (``trainer.data.config``), the
official solver's hyper-parameters, checkpointing and the evaluation hook. ``check_resumable``
says what a resume may not change. Nothing here imports the loop, the step or the solver, so
they all may import this module.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from core import config as typed_config
from core.device import Precision
from model.config import CheckpointFormat
from trainer.data.config import TrainDataConfig
from trainer.tuning import Tuning

__all__ = ["InitKind", "Precision", "EvalWeights", "EvalHookConfig", "TrainConfig", "load_train_config",
           "model_config", "public_config", "resume_config", "check_resumable", "RESUME_KEYS"]


class InitKind(str, enum.Enum):
    SCRATCH = "scratch"                    # every weight random
    PRETRAINED_PARTS = "pretrained_parts"  # the backbone / text encoder weights the model config names
    CHECKPOINT = "checkpoint"              # a whole GLIP: ours (save_pretrained folder) or an official .pth


class EvalWeights(str, enum.Enum):
    EMA = "ema"          # the EMA weights (the model's when ema_decay is 0)
    MODEL = "model"


@dataclass
class EvalHookConfig:
    every: int = 0                                        # steps between evaluations; 0 = off
    configs: list[str] = field(default_factory=list)      # `pipeline eval` YAMLs (checkpoint/output set here)
    overrides: list[str] = field(default_factory=list)    # applied to every eval config
    weights: EvalWeights = EvalWeights.EMA

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")
        if self.every and not self.configs:
            raise ValueError("eval.every is set but eval.configs is empty: list `pipeline eval` YAML files")


@dataclass
class TrainConfig:
    model: str = "tiny"                     # model config: tiny | glip_t | glip_l | a YAML path
    model_overrides: list[str] = field(default_factory=list)
    init: InitKind = InitKind.PRETRAINED_PARTS
    init_checkpoint: str = ""               # init=checkpoint: a folder of ours or an official .pth (path/URL)
    init_checkpoint_format: CheckpointFormat = CheckpointFormat.AUTO
    tuning: Tuning = Tuning.FULL            # what is trained: full | prompt | linear_probe | head (trainer.tuning)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    batch_size: int = 64                    # global (official IMS_PER_BATCH), split evenly over workers
    max_iter: int = 1000
    lr: float = 1e-4                        # BASE_LR
    lang_lr: float = 1e-5                   # LANG_LR (language.* tensors)
    weight_decay: float = 1e-4
    bias_lr_factor: float = 2.0             # BIAS_LR_FACTOR
    bias_weight_decay: float = 0.0          # WEIGHT_DECAY_BIAS
    # ours: parameter-name prefix -> lr factor (longest prefix wins), e.g. a fresh head learning
    # faster than pretrained parts: {head.bbox_pred: 10}
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    warmup_iters: int = 2000
    warmup_factor: float = 0.001
    steps: tuple[float, ...] = (0.67, 0.89)  # fractions of max_iter where the lr is multiplied by gamma
    gamma: float = 0.1
    clip_grad: float = 1.0                  # full-model L2 norm; 0 = no clipping
    precision: Precision = Precision.FP32   # the official GLIP-T trains fp16 (USE_AMP) on GPUs
    ema_decay: float = 0.999                # MODEL_EMA; 0 = no EMA
    gradient_checkpointing: bool = False    # recompute the head's blocks in backward (less memory)
    max_empty_fraction: float = 0.1         # MAX_NEG_PER_BATCH: skip batches with more images without boxes
    output: str = ""                        # run folder (local or fsspec URL)
    storage_options: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2               # newest checkpoints kept; 0 = all
    log_every: int = 20
    seed: int = 0
    eval: EvalHookConfig = field(default_factory=EvalHookConfig)
    progress: bool = True

    def validate(self) -> None:
        if not self.output:
            raise ValueError("output is empty: give the run folder, e.g. output=out/train1")
        if self.init is InitKind.CHECKPOINT and not self.init_checkpoint:
            raise ValueError("init=checkpoint needs init_checkpoint (a save_pretrained folder or an official .pth)")
        if self.init is not InitKind.CHECKPOINT and self.init_checkpoint:
            raise ValueError(f"init_checkpoint is set but init is {self.init.value!r}; set init=checkpoint")
        for key in ("batch_size", "max_iter", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "lang_lr", "weight_decay", "bias_lr_factor", "bias_weight_decay", "clip_grad"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value}")
        for prefix, factor in self.lr_multipliers.items():
            if not prefix or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
                raise ValueError(f"lr_multipliers: {prefix!r}: {factor!r} must map a non-empty parameter-name "
                                 "prefix to a finite factor >= 0, e.g. {head.bbox_pred: 10}")
        if self.warmup_iters < 0 or not 0 < self.warmup_factor <= 1:
            raise ValueError("warmup_iters must be >= 0 and warmup_factor in (0, 1]")
        if any(not 0 < f <= 1 for f in self.steps) or list(self.steps) != sorted(self.steps):
            raise ValueError(f"steps must be increasing fractions of max_iter in (0, 1], got {list(self.steps)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if not 0 <= self.max_empty_fraction <= 1:
            raise ValueError(f"max_empty_fraction must be in [0, 1], got {self.max_empty_fraction}")
        if self.keep_checkpoints < 0:
            raise ValueError("keep_checkpoints must be >= 0 (0 keeps all)")
        if self.tuning is Tuning.PROMPT:
            from trainer.data.config import SourceKind
            from trainer.data.prompts import PromptSampling
            loose = [n for n, s in self.data.sources.items()
                     if s.kind is not SourceKind.COCO or s.prompt.sampling is not PromptSampling.FIXED]
            if loose:
                raise ValueError(f"tuning=prompt learns one tensor per prompt position, so every source must be "
                                 f"coco with the fixed prompt; data.sources {loose}: set "
                                 f"data.sources.NAME.prompt.sampling=fixed (or use pipeline finetune)")


def load_train_config(path: str | None, overrides: list[str] | None = None, cls: type = TrainConfig):
    """YAML file (optional) + ``key=value`` overrides -> a validated config of ``cls``."""
    return typed_config.load(cls, path, overrides)


def model_config(cfg: TrainConfig):
    from model.config import load_model_config
    overrides = list(cfg.model_overrides)
    if cfg.gradient_checkpointing:
        overrides.append("head.gradient_checkpointing=true")
    if cfg.tuning is not Tuning.FULL:                  # the official overrides freeze the text encoder
        overrides.append("language.freeze=true")
    return load_model_config(cfg.model, overrides)


def public_config(cfg: TrainConfig) -> dict:
    """The config as plain values with every ``storage_options`` value redacted (they may hold
    credentials; this is what goes into checkpoints and OUTPUT/train_config.json)."""
    def redact(node):
        if isinstance(node, dict):
            return {k: ({kk: "<redacted>" for kk in v} if k == "storage_options" and isinstance(v, dict)
                        else redact(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [redact(v) for v in node]
        return node
    return redact(typed_config.to_dict(cfg))


RESUME_KEYS = ("batch_size", "seed", "data", "model", "tuning")     # what a resume may not change
_NO_EFFECT = ("data.prefetch_batches", "data.max_consecutive_skips")   # may change on a resume


def resume_config(cfg: TrainConfig) -> dict:
    """The part of the config a resumed run must share with its checkpoint (the data position
    and the weights' meaning depend on it); stored in the checkpoint and in its pointer."""
    public = public_config(cfg)
    return {k: public[k] for k in RESUME_KEYS}


def _differences(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))]
    if path in _NO_EFFECT or a == b:
        return []
    return [f"{path}: {a!r} in the checkpoint, {b!r} now"]


def check_resumable(saved: dict, saved_world_size: int | None, cfg: TrainConfig, world_size: int) -> None:
    """Raise ValueError naming what differs between a checkpoint's run and this one."""
    if saved_world_size is not None and saved_world_size != world_size:
        raise ValueError(f"the checkpoint was written by {saved_world_size} workers; resume with "
                         f"ray.num_workers={saved_world_size} (each worker's data position is saved)")
    now = resume_config(cfg)
    diffs = _differences({k: saved[k] for k in RESUME_KEYS if k in saved},
                         {k: now[k] for k in RESUME_KEYS if k in saved}, "")
    if diffs:
        raise ValueError("the run's config differs from the checkpoint's (" + "; ".join(diffs[:5])
                         + "); resume with the run's config, or start a new output")
