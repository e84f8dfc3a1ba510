"""The official Swin v1, detection variant: GLIP-T's and GLIP-L's image backbone.

``SwinTransformer`` returns the stride 8/16/32 maps (C3, C4, C5) as NCHW tensors with the
official parameter names (``backbone.body.*`` in the checkpoints); ``model.backbone`` wraps it
with the FPN.

Why our own Swin and not timm's
-------------------------------
GLIP's Swin is the Swin-Transformer-Object-Detection variant (docs/architecture.md, "The model"). timm 1.0.31's
``SwinTransformer`` computes different numbers for detection-sized inputs:

* timm rolls the map *before* padding it to a window multiple (``_attn``: roll, then pad); the
  official pads with zeros after ``norm1`` and rolls the *padded* map, so different tokens share
  a window whenever H or W is not a window multiple (almost every detection input);
* timm shrinks the window (and turns the shift off) when a stage's map is smaller than the window
  (``_calc_window_shift``); the official always uses the full window and pads;
* timm fixes the shift mask at construction for one input size (or builds it from the unpadded
  roll); the official builds it per forward on the padded size;
* timm has no per-stage output norms (``norm1..3``) and names the merge layers one stage later.

Any of these changes outputs, so this module re-implements the official computation (~200 lines)
with the official parameter names: checkpoint conversion for the body is the identity.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, trunc_normal_

from model.config import SwinConfig

__all__ = ["SwinTransformer", "SwinBlock", "WindowAttention", "load_swin_imagenet", "window_partition",
           "window_reverse", "relative_position_index", "shift_attention_mask"]


# --------------------------------------------------------------------------------------------
# Swin v1, detection variant (official names)
# --------------------------------------------------------------------------------------------

def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of ws) -> [B * nW, ws, ws, C], windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """Inverse of ``window_partition``: [B * nW, ws, ws, C] -> [B, H, W, C]."""
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


def relative_position_index(ws: int) -> torch.Tensor:
    """[ws², ws²] int64: index into the ((2ws-1)², heads) bias table for each token pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


def shift_attention_mask(Hp: int, Wp: int, ws: int, shift: int, device: torch.device) -> torch.Tensor:
    """[nW, ws², ws²] additive mask (0 / -100) for shifted windows on the padded Hp x Wp map."""
    img = torch.zeros((1, Hp, Wp, 1), device=device)
    cnt = 0
    for h in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for w in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, h, w, :] = cnt
            cnt += 1
    win = window_partition(img, ws).view(-1, ws * ws)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, ws: int, num_heads: int):
        super().__init__()
        self.ws, self.num_heads = ws, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        # Persistent, as in the official checkpoints (so every official key has a home).
        self.register_buffer("relative_position_index", relative_position_index(ws))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B*nW, N, C], mask [nW, N, N] or None -> [B*nW, N, C]."""
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B_, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ws: int, shift: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, H: int, W: int, mask: torch.Tensor) -> torch.Tensor:
        """x [B, H*W, C] -> [B, H*W, C]. Pads with zeros after norm1, then rolls the padded map."""
        B, L, C = x.shape
        ws = self.ws
        y = self.norm1(x).view(B, H, W, C)
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = y.shape[1], y.shape[2]
        if self.shift > 0:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(y, ws).view(-1, ws * ws, C), mask if self.shift > 0 else None)
        y = window_reverse(windows.view(-1, ws, ws, C), ws, Hp, Wp)
        if self.shift > 0:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        y = y[:, :H, :W, :].contiguous().view(B, H * W, C)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """[B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]; odd sizes are zero-padded first."""
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, ws: int, mlp_ratio: float,
                 drop_path: list[float], downsample: bool):
        super().__init__()
        self.ws, self.shift = ws, ws // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, ws, 0 if i % 2 == 0 else ws // 2, mlp_ratio, drop_path[i])
            for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, H*W, C] -> (stage output [B, H*W, C], merged [B, ceil(H/2)*ceil(W/2), 2C] or None)."""
        Hp, Wp = math.ceil(H / self.ws) * self.ws, math.ceil(W / self.ws) * self.ws
        mask = shift_attention_mask(Hp, Wp, self.ws, self.shift, x.device).to(x.dtype)
        for blk in self.blocks:
            x = blk(x, H, W, mask)
        return x, (self.downsample(x, H, W) if self.downsample is not None else None)


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, C, ceil(H/4), ceil(W/4)] (right/bottom zero padding to a multiple of 4)."""
        H, W = x.shape[-2:]
        if W % self.patch:
            x = F.pad(x, (0, self.patch - W % self.patch))
        if H % self.patch:
            x = F.pad(x, (0, 0, 0, self.patch - H % self.patch))
        x = self.proj(x)
        B, C, Wh, Ww = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(B, C, Wh, Ww)


class SwinTransformer(nn.Module):
    """Official GLIP Swin body (``SWINT-FPN-RETINANET``): outputs C3, C4, C5 with norms norm1..3.

    The stride-4 stage-0 output is not returned (the official ``norm0`` is Identity and the FPN
    ignores it). ``frozen_stages`` = N freezes the patch embedding and stages 0..N-1 (official
    FREEZE_CONV_BODY_AT = N + 1); -1 freezes nothing. Frozen parts stay in eval mode.
    """

    def __init__(self, cfg: SwinConfig, frozen_stages: int = -1):
        super().__init__()
        n = len(cfg.depths)
        self.frozen_stages = frozen_stages
        self.patch_embed = PatchEmbed(cfg.embed_dim)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(n):
            lo, hi = sum(cfg.depths[:i]), sum(cfg.depths[:i + 1])
            self.layers.append(SwinStage(cfg.embed_dim * 2 ** i, cfg.depths[i], cfg.num_heads[i],
                                         cfg.window_size, cfg.mlp_ratio, dpr[lo:hi], i < n - 1))
        self.num_features = [cfg.embed_dim * 2 ** i for i in range(n)]
        for i in range(1, n):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.out_channels = self.num_features[1:]
        self.apply(_init_swin)
        self._freeze()

    def _freeze(self) -> None:
        if self.frozen_stages < 0:
            return
        for m in [self.patch_embed, *self.layers[:self.frozen_stages]]:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> "SwinTransformer":
        super().train(mode)
        self._freeze()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B, 3, H, W] -> [C3 [B, 2C, H/8, W/8], C4 [B, 4C, H/16, W/16], C5 [B, 8C, H/32, W/32]]."""
        x = self.patch_embed(x)
        H, W = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, stage in enumerate(self.layers):
            out, merged = stage(x, H, W)
            if i > 0:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            if merged is not None:
                x, H, W = merged, (H + 1) // 2, (W + 1) // 2
        return outs


def _init_swin(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def load_swin_imagenet(body: SwinTransformer, path: str | Path) -> list[str]:
    """Load Microsoft ImageNet Swin weights (e.g. swin_tiny_patch4_window7_224.pth) into ``body``.

    The classification checkpoint has the same names; its ``head``/``norm`` and ``attn_mask``
    entries are dropped. Returns the names left at their initialisation (the detection out norms
    ``norm1..3``); raises on any other missing key or a shape mismatch.
    """
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("model", sd)
    sd = {k: v for k, v in sd.items()
          if not k.startswith(("head.", "norm.")) and not k.endswith(".attn_mask")}
    own = body.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs ours {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and v.shape != own[k].shape]
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    expected_missing = {k for k in own if k.split(".")[0] in {f"norm{i}" for i in range(1, 4)}}
    if bad or unexpected or set(missing) - expected_missing:
        raise ValueError(f"{path}: not a Swin checkpoint for this config; shape mismatches {bad[:5]}, "
                         f"unexpected {unexpected[:5]}, missing {sorted(set(missing) - expected_missing)[:5]}")
    body.load_state_dict(sd, strict=False)
    return missing
