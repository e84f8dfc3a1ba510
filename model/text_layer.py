"""The per-block BERT layer of the VL-DyHead (docs/model.md §4.3): a BertLayer with clamps.

Same parameter names as ``transformers``' BertLayer (``attention.self.{query,key,value}``,
``attention.output.{dense,LayerNorm}``, ``intermediate.dense``, ``output.{dense,LayerNorm}``),
built from the language model's ``BertConfig``. Differences from HF (official
``rpn/modeling_bert.py``): attention scores clamped to ±50000 before the mask; the intermediate
activation clamped before and after the non-linearity; the output clamped before and after its
LayerNorm. Randomly initialised with PyTorch defaults (the official layer never calls
``init_weights``); a GLIP checkpoint supplies the weights.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BertConfig
from transformers.activations import ACT2FN

CLAMP = 50000.0


def _clamp(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=-CLAMP, max=CLAMP)


class _SelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden: [B, T, D]; mask: [B, T] (1 = real token). Returns the context [B, T, D]."""
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        scores = _clamp(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim))
        if mask is not None:
            # HF adds (1 - mask) * finfo.min: identical softmax, and a fill stays finite.
            scores = scores.masked_fill((mask == 0)[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = self.dropout(scores.softmax(dim=-1))
        context = torch.matmul(probs, v).permute(0, 2, 1, 3)
        return context.reshape(hidden.shape[0], hidden.shape[1], -1)


class _SelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class _Attention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = _SelfAttention(config)
        self.output = _SelfOutput(config)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, mask), hidden)


class _Intermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        act = config.hidden_act
        self.act = ACT2FN[act] if isinstance(act, str) else act

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _clamp(self.act(_clamp(self.dense(hidden))))


class _Output(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden = _clamp(self.dropout(self.dense(hidden)))
        return _clamp(self.LayerNorm(hidden + residual))


class TextLayer(nn.Module):
    """Self-attention + feed-forward over the text tokens (official ``BertEncoderLayer``)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _Output(config)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden: [B, T, D]; mask: [B, T] (1 = real token). Returns [B, T, D]."""
        attended = self.attention(hidden, mask)
        return self.output(self.intermediate(attended), attended)
