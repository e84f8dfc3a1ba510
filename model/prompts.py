"""Prompts and token maps (docs/model.md §7, §8; official ``engine/inference.py``, ``modulated_coco.py``).

- Detection prompt: class names cleaned (``clean_name``) and joined by ``". "`` with no trailing
  separator, e.g. ``"person. bicycle. car"``; each name's character span is its entity.
- Long vocabularies are split into consecutive chunks of ``chunk_size`` names (official
  ``TEST.CHUNKED_EVALUATION``); each chunk is its own prompt and carries the global indices of
  its names in ``Prompt.labels``.
- Positive map: entity i -> the tokens its character spans cover, found with a fast
  tokenizer's ``char_to_token`` and the official fallbacks (begin: +1, +2; end: -2, -3 counted
  from the exclusive end). Spans that fall into truncated text map to no token (an all-zero row).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

SEPARATOR = ". "
Span = tuple[int, int]


def clean_name(name: str) -> str:
    """Official ``clean_name``: drop "(...)", "_" -> " ", "  " -> " " (one pass each)."""
    name = re.sub(r"\(.*\)", "", name)
    name = re.sub(r"_", " ", name)
    return re.sub(r"  ", " ", name)


@dataclass(frozen=True)
class Prompt:
    """A caption and its entities: entity i grounds the spans ``tokens_positive[i]`` and is
    entity ``labels[i]`` of the full vocabulary."""
    caption: str
    tokens_positive: list[list[Span]]
    labels: list[int] = field(default_factory=list)


def build_prompt(names: Sequence[str], separator: str = SEPARATOR,
                 labels: Sequence[int] | None = None) -> Prompt:
    """Names -> ``Prompt`` with one span per (cleaned) name, in the given order.

    ``labels`` defaults to ``range(len(names))``.
    """
    labels = list(range(len(names))) if labels is None else list(labels)
    if len(labels) != len(names):
        raise ValueError(f"{len(names)} names but {len(labels)} labels")
    caption, spans = "", []
    for i, name in enumerate(names):
        start = len(caption)
        caption += clean_name(name)
        spans.append([(start, len(caption))])
        if i != len(names) - 1:
            caption += separator
    return Prompt(caption, spans, labels)


def build_chunked_prompts(names: Sequence[str], chunk_size: int = 40,
                          separator: str = SEPARATOR) -> list[Prompt]:
    """One prompt per consecutive chunk of ``chunk_size`` names; ``labels`` are global indices,
    so every name is in exactly one chunk. ``chunk_size <= 0`` means a single prompt."""
    if chunk_size <= 0:
        chunk_size = max(len(names), 1)
    return [build_prompt(names[i:i + chunk_size], separator, range(i, min(i + chunk_size, len(names))))
            for i in range(0, len(names), chunk_size)]


def tokenize(tokenizer, captions: Sequence[str], max_len: int = 256, pad_to_max: bool = True):
    """The official tokenizer call: truncation at ``max_len``, padded to ``max_len``
    (``pad_to_max``, official PAD_MAX) or to the longest caption. Returns a BatchEncoding of
    [B, T] tensors (``input_ids``, ``attention_mask``) that also answers ``char_to_token``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast tokenizer is needed (char_to_token)")
    return tokenizer(list(captions), max_length=max_len, truncation=True,
                     padding="max_length" if pad_to_max else "longest", return_tensors="pt")


def _char_to_token(encoding, batch_index: int, char_index: int) -> int | None:
    if char_index < 0:
        return None
    try:
        return encoding.char_to_token(batch_index, char_index)
    except Exception:   # out-of-range indices raise in some tokenizer versions
        return None


def span_to_token_range(encoding, span: Span, batch_index: int = 0) -> tuple[int, int] | None:
    """Character span [beg, end) -> inclusive token range (first, last), or None if unmapped."""
    beg, end = span
    first = _char_to_token(encoding, batch_index, beg)
    if first is None:
        first = _char_to_token(encoding, batch_index, beg + 1)
        if first is None:
            first = _char_to_token(encoding, batch_index, beg + 2)
    last = _char_to_token(encoding, batch_index, end - 1)
    if last is None:
        last = _char_to_token(encoding, batch_index, end - 2)
        if last is None:
            last = _char_to_token(encoding, batch_index, end - 3)
    if first is None or last is None:
        return None
    return first, last


def positive_map(encoding, tokens_positive: Sequence[Sequence[Span]], num_tokens: int,
                 batch_index: int = 0) -> torch.Tensor:
    """Binary map [num_entities, num_tokens] float32: 1 where entity i's spans cover token j.

    encoding: a fast tokenizer's BatchEncoding of the caption (e.g. from ``tokenize``);
    ``batch_index`` selects the caption inside it. ``num_tokens`` is the text length the model
    sees (>= the number of tokens of this caption).
    """
    n_tok = len(encoding["input_ids"][batch_index])
    if n_tok > num_tokens:
        raise ValueError(f"the caption has {n_tok} tokens, more than num_tokens={num_tokens}")
    pmap = torch.zeros(len(tokens_positive), num_tokens, dtype=torch.float32)
    for i, spans in enumerate(tokens_positive):
        for span in spans:
            rng = span_to_token_range(encoding, tuple(span), batch_index)
            if rng is not None:
                pmap[i, rng[0]:rng[1] + 1] = 1.0
    return pmap


def normalize_positive_map(pmap: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sums (official ``positive_map / (sum + 1e-6)``): [N, T] -> [N, T]."""
    return pmap / (pmap.sum(-1, keepdim=True) + 1e-6)


def label_to_tokens(pmap: torch.Tensor) -> list[list[int]]:
    """[N, T] map -> for each entity the token indices it covers (official label->token dict,
    0-based)."""
    return [torch.nonzero(row, as_tuple=True)[0].tolist() for row in pmap]


def prompt_positive_maps(tokenizer, prompts: Sequence[Prompt], max_len: int = 256,
                         pad_to_max: bool = True):
    """Tokenize the prompts' captions and build their binary maps.

    Returns (BatchEncoding with [B, T] tensors, list of [N_i, T] binary maps).
    """
    encoding = tokenize(tokenizer, [p.caption for p in prompts], max_len, pad_to_max)
    num_tokens = encoding["input_ids"].shape[1]
    maps = [positive_map(encoding, p.tokens_positive, num_tokens, batch_index=b)
            for b, p in enumerate(prompts)]
    return encoding, maps
