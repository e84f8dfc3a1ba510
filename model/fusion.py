"""Bi-directional vision-language cross-attention of the VL-DyHead (docs/model.md §4.2, official "MHA-B").

All pyramid levels are flattened (row-major H·W) and concatenated into ONE visual sequence that
attends to the text and is attended by it, in a single call. The residual is added to the
LayerNorm'd inputs (``v = LN(v) + γ_v·Δv``, ``l = LN(l) + γ_l·Δl``).

State-dict names (official ``dyhead_tower.{3i}.b_attn.*``): ``gamma_v``, ``gamma_l``,
``layer_norm_v``, ``layer_norm_l``, ``attn.{v_proj,l_proj,values_v_proj,values_l_proj,
out_v_proj,out_l_proj}``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLAMP = 50000.0        # official clamp for fp16 safety ("Do not increase 50000")
TEXT_MASK_VALUE = -9e15


def masked_fill_value(dtype: torch.dtype, value: float) -> float:
    """``value`` if the dtype can hold it, else the dtype's most negative finite number."""
    return max(value, torch.finfo(dtype).min)


class BiMultiHeadAttention(nn.Module):
    """Image<->text multi-head attention with separate value/output projections per direction."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = dropout
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for lin in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj,
                    self.out_v_proj, self.out_l_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, E] -> [B * h, S, d]"""
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2).reshape(
            b * self.num_heads, s, self.head_dim)

    def _merge(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """[B * h, S, d] -> [B, S, E]"""
        s = x.shape[1]
        return x.view(b, self.num_heads, s, self.head_dim).transpose(1, 2).reshape(b, s, self.embed_dim)

    def forward(self, v: torch.Tensor, l: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """v: [B, N, Cv] visual sequence; l: [B, T, Cl] text; text_mask: [B, T] (1 = real token).

        Returns (Δv [B, N, Cv], Δl [B, T, Cl]). Operation order is the official one: q scaled
        before the matmul; scores clamped ±50000; the text side subtracts its row max, clamps and
        softmaxes over ALL visual positions; the visual side masks padded tokens (-9e15) and
        softmaxes over tokens; dropout on both probability maps.
        """
        b, n, _ = v.shape
        q = self._heads(self.v_proj(v) * self.scale)
        k = self._heads(self.l_proj(l))
        value_v = self._heads(self.values_v_proj(v))
        value_l = self._heads(self.values_l_proj(l))

        attn = torch.bmm(q, k.transpose(1, 2)).clamp(min=-CLAMP, max=CLAMP)   # [B*h, N, T]

        attn_t = attn.transpose(1, 2)                                          # [B*h, T, N]
        attn_l = (attn_t - attn_t.max(dim=-1, keepdim=True)[0]).clamp(min=-CLAMP, max=CLAMP)
        attn_l = attn_l.softmax(dim=-1)

        if text_mask is not None:
            # The official code adds a (1 / -9e15) mask; a masked_fill gives the same softmax
            # (real tokens shift by a constant, padded ones underflow to 0) and stays finite
            # in fp16.
            pad = (text_mask == 0)[:, None, None, :]                             # [B, 1, 1, T]
            fill = masked_fill_value(attn.dtype, TEXT_MASK_VALUE)
            attn = attn.view(b, self.num_heads, n, -1).masked_fill(pad, fill).view(
                b * self.num_heads, n, -1)
        attn_v = attn.softmax(dim=-1)

        attn_v = F.dropout(attn_v, p=self.dropout, training=self.training)
        attn_l = F.dropout(attn_l, p=self.dropout, training=self.training)
        out_v = torch.bmm(attn_v, value_l)                                     # [B*h, N, d]
        out_l = torch.bmm(attn_l, value_v)                                     # [B*h, T, d]
        return self.out_v_proj(self._merge(out_v, b)), self.out_l_proj(self._merge(out_l, b))


class VLFuse(nn.Module):
    """One fusion step over all pyramid levels (official ``BiAttentionBlockForCheckpoint``)."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int = 2048, num_heads: int = 8,
                 dropout: float = 0.1, init_gamma: float = 1.0 / 6):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout)
        self.gamma_v = nn.Parameter(init_gamma * torch.ones(v_dim))
        self.gamma_l = nn.Parameter(init_gamma * torch.ones(l_dim))

    def forward(self, visual: list[torch.Tensor], text: torch.Tensor,
                text_mask: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """visual: list of [B, C, H_l, W_l]; text: [B, T, D]; text_mask: [B, T].

        Returns (list of [B, C, H_l, W_l], [B, T, D]).
        """
        b, c = visual[0].shape[:2]
        sizes = [tuple(x.shape[-2:]) for x in visual]
        v = torch.cat([x.permute(0, 2, 3, 1).reshape(b, -1, c) for x in visual], dim=1)
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(text)
        delta_v, delta_l = self.attn(v, l, text_mask)
        v = v + self.gamma_v * delta_v
        l = l + self.gamma_l * delta_l

        v = v.transpose(1, 2)                                                  # [B, C, N]
        out, start = [], 0
        for h, w in sizes:
            out.append(v[:, :, start:start + h * w].reshape(b, -1, h, w).contiguous())
            start += h * w
        return out, l
