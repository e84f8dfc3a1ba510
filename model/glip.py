"""GLIP: image backbone + FPN, BERT, VL-DyHead, anchors (official ``GeneralizedVLRCNN``, RPN only).

Children (the state-dict contract; checkpoint.py maps the official names onto them):
``backbone`` (``body.*`` Swin or timm, ``fpn.*``), ``language`` (``model.*`` = BertModel without
pooler), ``head`` (VLDyHead), ``anchor_generator`` (``cell_anchors.{l}`` buffers); ``prompt_tuning``
(``weight``) only on a prompt-tuned model (model/prompt_tuning.py).

Inputs follow the official test pipeline (model/transforms.py): BGR, 0-255, normalised, padded
to a multiple of 32; ``image_sizes`` are the (h, w) before padding (boxes are clipped to them).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import BatchEncoding

from model.anchors import AnchorGenerator
from model.backbone import VisionBackbone, build_backbone
from model.config import ModelConfig
from model.head import VLDyHead
from model.language import LanguageEncoder


class GLIP(nn.Module):
    def __init__(self, cfg: ModelConfig, backbone: VisionBackbone, language: LanguageEncoder,
                 head: VLDyHead, anchor_generator: AnchorGenerator):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.language = language
        self.head = head
        self.anchor_generator = anchor_generator
        self.prompt_tuning = None           # model.prompt_tuning.PromptTuning when prompt-tuned (attach)

    @property
    def tokenizer(self):
        return self.language.tokenizer

    def tokenize(self, captions: list[str]) -> BatchEncoding:
        """captions -> fast-tokenizer BatchEncoding (``input_ids``, ``attention_mask`` [B, T],
        ``offset_mapping``); T = max_query_len when ``language.pad_to_max``, else the longest."""
        return self.language.tokenize(captions)

    def forward(self, images: torch.Tensor, image_sizes: list[tuple[int, int]],
                input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """images [B, 3, H, W] (normalised, padded), image_sizes [(h, w)] * B, input_ids and
        attention_mask [B, T] -> the head's dict (``token_logits`` list of [B, H_l*W_l*A, T],
        ``box_regression`` list of [B, 4A, H_l, W_l], ``centerness`` list of [B, A, H_l, W_l],
        ``text_hidden`` [B, T, D], ``visual`` list of [B, C, H_l, W_l]) plus ``anchors`` (list
        over levels of [H_l*W_l*A, 4] xyxy) and ``image_sizes``."""
        if images.shape[0] != len(image_sizes) or images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"batch mismatch: {images.shape[0]} images, {len(image_sizes)} image sizes, "
                             f"{input_ids.shape[0]} prompts")
        text = self.language(input_ids, attention_mask)      # official order: text, then image
        hidden = text["hidden"] if self.prompt_tuning is None else self.prompt_tuning(text["hidden"])
        features = self.backbone(images)
        out = self.head(features, hidden, text["mask"])
        out["anchors"] = self.anchor_generator(features, tuple(images.shape[-2:]))
        out["image_sizes"] = [tuple(int(v) for v in s) for s in image_sizes]
        return out


def build_glip(cfg: ModelConfig, load_weights: bool = True,
               device: str | torch.device | None = None) -> GLIP:
    """The network for ``cfg``. ``load_weights`` loads the pretrained parts the config names
    (``backbone.weights``, a packaged/local language model); off when a full checkpoint follows.

    ``device="meta"`` builds without allocating (no weights loaded; fill it with
    ``checkpoint.load_into(model, state_dict, assign=True)``). The anchor generator's few cell
    anchors are always computed on the CPU (their values are derived, not learnt).
    """
    cfg.validate()
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "meta":
        load_weights = False
    with device if device is not None else contextlib.nullcontext():
        language = LanguageEncoder(cfg.language, load_weights=load_weights)
        backbone = build_backbone(cfg, load_weights=load_weights)
        head = VLDyHead(cfg, language.config)
    with torch.device("cpu"):
        anchor_generator = AnchorGenerator(cfg.anchors)
    if device is not None and device.type != "meta":
        anchor_generator = anchor_generator.to(device)
    return GLIP(cfg, backbone=backbone, language=language, head=head, anchor_generator=anchor_generator)
