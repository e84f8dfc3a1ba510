"""VL-DyHead: the GLIP detection head (docs/model.md §4, official ``rpn/vldyhead.py``).

A tower of ``num_blocks`` blocks, each ``[fusion -> text_layer -> dyconv]`` (only ``dyconv``
when ``head.fusion`` is ``none``, official GLIP-T(A)), then per level: box regression
(``bbox_pred`` x a learnt per-level scale), centerness, and dot-product logits of every anchor
against every token:

    e = normalize(text);  P = token_proj(e / 2);  b = e @ bias_lang + bias0
    logit[l] = clamp((X_l @ P^T) / exp(log_scale) + b, ±50000)

with X_l the tower's visual features, un-normalised. The text is the tower's fused text (with
fusion) or the language model's masked hidden state (without fusion, official ``embedded``).
Padded tokens' logits are computed like the official ones; the loss masks them.

State-dict names: see docs/model.md §4.1 and ``model/checkpoint.py`` (``blocks.{i}.{fusion,text_layer,dyconv}.*``,
``bbox_pred``, ``centerness``, ``token_proj``, ``scales.{l}.scale``, ``log_scale``,
``bias_lang``, ``bias0``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig

from model.config import FusionKind, ModelConfig
from model.dyconv import DyConv
from model.fusion import VLFuse
from model.text_layer import TextLayer

LOGIT_CLAMP = 50000.0


class Scale(nn.Module):
    """A learnt scalar multiplier (official ``layers.Scale``)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class VLDyHeadBlock(nn.Module):
    """One tower step: optional fusion (vision <-> text), optional text layer, DyConv (vision)."""

    def __init__(self, cfg: ModelConfig, text_config: BertConfig):
        super().__init__()
        head = cfg.head
        if head.fusion == FusionKind.MHA_B:
            self.fusion = VLFuse(head.channels, text_config.hidden_size, head.fusion_embed_dim,
                                 head.fusion_heads, head.fusion_dropout, 1.0 / head.num_blocks)
            self.text_layer = TextLayer(text_config)
        else:
            self.fusion = None
            self.text_layer = None
        self.dyconv = DyConv(head.channels, head.group_norm_groups)

    def forward(self, visual: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor,
                use_checkpoint: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """visual: list of [B, C, H_l, W_l]; text: [B, T, D]; text_mask: [B, T] -> same shapes."""
        if self.fusion is not None:
            if use_checkpoint:
                visual, text = checkpoint(self.fusion, visual, text, text_mask, use_reentrant=False)
            else:
                visual, text = self.fusion(visual, text, text_mask)
            text = self.text_layer(text, text_mask)
        return self.dyconv(visual), text


class VLDyHead(nn.Module):
    def __init__(self, cfg: ModelConfig, text_config: BertConfig):
        super().__init__()
        head = cfg.head
        num_anchors = len(cfg.anchors.aspect_ratios)
        num_levels = len(cfg.anchors.strides)
        if num_anchors != 1:
            raise ValueError(f"anchors.aspect_ratios={cfg.anchors.aspect_ratios}: the dot-product head "
                             "(official GLIP) supports one anchor per location")
        if head.token_dim != head.channels:
            raise ValueError(f"head.token_dim ({head.token_dim}) must equal head.channels "
                             f"({head.channels}): the image side of the dot product is the identity")
        self.use_fusion = head.fusion == FusionKind.MHA_B
        self.gradient_checkpointing = head.gradient_checkpointing
        self.blocks = nn.ModuleList([VLDyHeadBlock(cfg, text_config) for _ in range(head.num_blocks)])

        self.bbox_pred = nn.Conv2d(head.channels, 4 * num_anchors, kernel_size=1)
        self.centerness = nn.Conv2d(head.channels, num_anchors, kernel_size=1)
        for conv in (self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])

        bias_value = -math.log((1 - head.prior_prob) / head.prior_prob)
        self.token_proj = nn.Linear(text_config.hidden_size, head.token_dim)
        self.log_scale = nn.Parameter(torch.tensor([head.log_scale], dtype=torch.float32))
        self.bias_lang = nn.Parameter(torch.zeros(text_config.hidden_size))
        self.bias0 = nn.Parameter(torch.tensor([bias_value], dtype=torch.float32))

    def forward(self, features: list[torch.Tensor], text_hidden: torch.Tensor,
                text_mask: torch.Tensor) -> dict:
        """features: list of [B, C, H_l, W_l] (P3..P7); text_hidden: [B, T, D] (unmasked last
        hidden state of the language model); text_mask: [B, T] (1 = real token).

        Returns {"token_logits": list of [B, H_l*W_l*A, T], "box_regression": list of
        [B, 4A, H_l, W_l], "centerness": list of [B, A, H_l, W_l], "text_hidden": [B, T, D]
        (text after the tower), "visual": list of [B, C, H_l, W_l] (tower output)}.
        """
        if len(features) != len(self.scales):
            raise ValueError(f"got {len(features)} feature levels, the head has {len(self.scales)}")
        visual, text = list(features), text_hidden
        use_checkpoint = self.gradient_checkpointing and self.training
        for block in self.blocks:
            visual, text = block(visual, text, text_mask, use_checkpoint)

        if self.use_fusion:
            embedding = text
        else:   # official USE_FUSED_FEATURES_DOT_PRODUCT False: the masked language features
            embedding = text_hidden * text_mask.unsqueeze(-1).to(text_hidden.dtype)
        embedding = F.normalize(embedding, p=2, dim=-1)
        proj_tokens = self.token_proj(embedding / 2.0)                        # [B, T, C]
        token_bias = torch.matmul(embedding, self.bias_lang) + self.bias0     # [B, T]

        token_logits, box_regression, centerness = [], [], []
        for level, x in enumerate(visual):
            box_regression.append(self.scales[level](self.bbox_pred(x)))
            centerness.append(self.centerness(x))
            b, c = x.shape[:2]
            queries = x.permute(0, 2, 3, 1).reshape(b, -1, c)                # [B, H*W, C]
            logits = torch.matmul(queries, proj_tokens.transpose(-1, -2)) / self.log_scale.exp()
            logits = logits + token_bias[:, None, :]
            token_logits.append(logits.clamp(min=-LOGIT_CLAMP, max=LOGIT_CLAMP))
        return {"token_logits": token_logits, "box_regression": box_regression,
                "centerness": centerness, "text_hidden": text, "visual": visual}
