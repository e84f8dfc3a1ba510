"""Training prompts: detection data as grounding, negative caption packing, pseudo-label screening.

The official GLIP recipe (docs/model.md §7; ``od_to_grounding.py``, ``coco_dt.py``, ``caption.py``),
drawn from a ``numpy.random.Generator`` so a seed fixes every choice:

- ``detection_to_grounding``: an image's positive classes are shuffled and kept while their
  ``clean_name(c) + ". "`` token counts fit ``max_tokens - 2`` (room for [CLS]/[SEP]); boxes of
  dropped classes are removed. The number of negatives follows ``control_prob`` (official
  ``generate_control_options_given_probabilities``): (one negative, one positive, full, drop
  positive) = (0, 0, 0.5, 0) -> 50% ``full = min(max_negatives, #classes)``, else uniform in
  ``[1, full]``. That many ids are drawn without replacement from all classes; positives among
  them are discarded; the rest are shuffled and kept while the remaining token budget stays
  positive. Positives and negatives are shuffled together and joined by ``". "`` with no
  trailing separator; each box's ``tokens_positive`` is its class name's character span.
  With ``sampling: fixed`` the prompt is instead every class of the vocabulary in its order,
  nothing shuffled or drawn: the prompt ``pipeline eval`` builds (what prompt tuning learns on).
- ``pack_negative_captions``: other images' captions are packed around a caption (official
  ``pack_caption``): none with ``no_random_pack_probability``, else ``pack_random_caption_number``
  with ``random_pack_prob``, else uniform in ``[0, number)``; each kept only while the total
  stays within ``max_tokens`` (SAFEGUARD_POSITIVE_CAPTION); every packed caption ends with "."
  and they are joined by " "; the positive caption's spans are shifted.
- ``screen_pseudo_labels``: FURTHER_SCREEN, boxes with ``score > min_score``.
- ``unlabelled_phrase_spans``: the spans of a caption's noun phrases that no box grounds (after
  screening): a pseudo source with ``unlabelled_phrases: ignore`` takes their tokens out of the
  token loss instead of teaching "this phrase is nowhere" (not in the official code, which keeps
  them as negatives everywhere).

Deliberate differences from the official code, all on the safe side: a class dropped for
positive overflow is never drawn back as a negative (the official only excludes the kept
positives); the negative budget is what the kept positives leave (the official also subtracts
the first positive that did not fit); caption packing draws negatives from the caller's pool
without replacement (the official draws random dataset indices with replacement) and an
identical negative caption is never mistaken for the positive one.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from model.prompts import SEPARATOR, build_prompt, clean_name
from stages.readers.common import sample_key
from stages.schema import Phrase, Sample

__all__ = ["PromptSampling", "DetectionPromptConfig", "CaptionPackingConfig", "NegativeMode", "sample_num_negatives",
           "detection_to_grounding", "pack_count", "pack_negative_captions", "screen_pseudo_labels"]

SPECIAL_TOKENS = 2   # [CLS] and [SEP]

_clean = functools.lru_cache(maxsize=1 << 16)(clean_name)     # a vocabulary's names recur every image


class PromptSampling(str, enum.Enum):
    SAMPLED = "sampled"   # official: shuffled positives + sampled negatives
    FIXED = "fixed"       # every class in the vocabulary's order: the evaluation prompt (prompt tuning)


@dataclass
class DetectionPromptConfig:
    sampling: PromptSampling = PromptSampling.SAMPLED
    max_negatives: int = 85                                 # DATASETS.RANDOM_SAMPLE_NEG
    # DATASETS.CONTROL_PROB: (one negative, one positive, full, drop positive); the last must be 0.
    control_prob: tuple[float, float, float, float] = (0.0, 0.0, 0.5, 0.0)
    max_tokens: int = 256                                   # MAX_QUERY_LEN, special tokens included
    separator: str = SEPARATOR                              # DATASETS.SEPARATION_TOKENS

    def validate(self) -> None:
        if self.max_negatives < 0:
            raise ValueError(f"max_negatives must be >= 0, got {self.max_negatives}")
        if len(self.control_prob) != 4 or any(not 0.0 <= p <= 1.0 for p in self.control_prob):
            raise ValueError(f"control_prob must be 4 probabilities, got {self.control_prob}")
        if sum(self.control_prob[:3]) > 1.0 + 1e-9:
            raise ValueError(f"control_prob's first three entries sum above 1: {self.control_prob}")
        if self.control_prob[3] != 0:
            raise ValueError("control_prob[3] (drop positives) must be 0, as in the official code")
        if self.max_tokens <= SPECIAL_TOKENS:
            raise ValueError(f"max_tokens must exceed {SPECIAL_TOKENS}, got {self.max_tokens}")


@dataclass
class CaptionPackingConfig:
    pack_random_caption_number: int = 20                    # DATASETS.PACK_RANDOM_CAPTION_NUMBER
    no_random_pack_probability: float = 0.4                 # DATASETS.NO_RANDOM_PACK_PROBABILITY
    random_pack_prob: float = 0.5                           # DATASETS.RANDOM_PACK_PROB
    safeguard_positive_caption: bool = True                 # DATASETS.SAFEGUARD_POSITIVE_CAPTION
    max_tokens: int = 256

    def validate(self) -> None:
        if self.pack_random_caption_number < 0:
            raise ValueError("pack_random_caption_number must be >= 0")
        for name in ("no_random_pack_probability", "random_pack_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")


class NegativeMode:
    """How the negative count was chosen (kept in ``meta["negative_mode"]``)."""
    ONE_NEGATIVE = "one_negative"
    ONE_POSITIVE = "one_positive"
    FULL = "full"
    RANDOM = "random"
    FIXED = "fixed"            # sampling: fixed (no negatives drawn)


def sample_num_negatives(rng: np.random.Generator, control_prob: Sequence[float],
                         full_negative: int) -> tuple[int, str]:
    """Official ``generate_control_options_given_probabilities`` (the negative half):
    -> (number of class ids to draw, ``NegativeMode``)."""
    p_one_neg, p_one_pos, p_full = control_prob[0], control_prob[1], control_prob[2]
    u = rng.random()
    if u < p_one_neg:
        return 1, NegativeMode.ONE_NEGATIVE
    if u < p_one_neg + p_one_pos:
        return 0, NegativeMode.ONE_POSITIVE
    if u < p_one_neg + p_one_pos + p_full:
        return full_negative, NegativeMode.FULL
    return int(rng.integers(1, max(1, full_negative) + 1)), NegativeMode.RANDOM


def token_lengths(tokenizer, texts: Sequence[str], special_tokens: bool = False) -> list[int]:
    """Token count of each text (``tokenizer.tokenize`` length, or with [CLS]/[SEP])."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=special_tokens)["input_ids"]
    return [len(x) for x in ids]


_NAME_LENGTHS: "weakref.WeakKeyDictionary[Any, dict[str, int]]" = weakref.WeakKeyDictionary()
_NAME_CACHE_LIMIT = 200_000


def name_lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """``token_lengths`` of class-name texts, cached per tokenizer (a vocabulary is tokenised once,
    not once per image)."""
    try:
        cache = _NAME_LENGTHS.setdefault(tokenizer, {})
    except TypeError:                       # not weak-referenceable: no cache
        return token_lengths(tokenizer, texts)
    missing = list(dict.fromkeys(t for t in texts if t not in cache))
    if missing:
        if len(cache) + len(missing) > _NAME_CACHE_LIMIT:
            cache.clear()
        cache.update(zip(missing, token_lengths(tokenizer, missing)))
    return [cache[t] for t in texts]


def _boxes_and_labels(item: Any) -> tuple[Sample, list[list[float]], list]:
    """A ``Sample`` (``meta["category_ids"]``), a ``CocoImage`` or a dict record -> (base sample,
    boxes, category id per box)."""
    if isinstance(item, Sample):
        labels = item.meta.get("category_ids")
        if labels is None:
            raise ValueError(f"sample {item.key!r} has no meta['category_ids']: not a detection sample")
        return item, [list(b) for b in item.boxes], list(labels)
    if isinstance(item, Mapping):
        labels = item.get("category_ids", (item.get("meta") or {}).get("category_ids"))
        if labels is None:
            raise ValueError(f"record {item.get('key')!r} has no category_ids")
        base = Sample(key=str(item.get("key", "")), input_shard=str(item.get("input_shard", "")),
                      source=str(item.get("source", "")), width=item.get("width"),
                      height=item.get("height"), meta=dict(item.get("meta") or {}))
        return base, [list(b) for b in item.get("boxes", [])], list(labels)
    if hasattr(item, "category_ids") and hasattr(item, "boxes"):        # stages.readers.coco.CocoImage
        base = Sample(key=sample_key(item.image_id), input_shard="", width=item.width, height=item.height,
                      meta={"image_id": item.image_id, "file_name": item.file_name})
        return base, [list(b) for b in item.boxes], list(item.category_ids)
    raise TypeError(f"cannot read boxes and category ids from {type(item).__name__}")


def detection_to_grounding(sample_or_record: Any, category_names: Mapping[Any, str], tokenizer,
                           rng: np.random.Generator,
                           cfg: DetectionPromptConfig | None = None) -> Sample:
    """One detection image -> a grounding ``Sample`` with a sampled class-name prompt.

    ``category_names`` is the whole vocabulary ``{category id: name}`` (negatives come from it).
    The result's ``phrases`` are every class name in the prompt; ``meta`` adds
    ``prompt_category_ids`` (the class of each phrase), ``negative_mode``,
    ``num_negatives_drawn`` and ``overflow_category_ids`` (positives dropped for length).
    """
    cfg = cfg or DetectionPromptConfig()
    cfg.validate()
    base, boxes, labels = _boxes_and_labels(sample_or_record)
    if len(boxes) != len(labels):
        raise ValueError(f"sample {base.key!r}: {len(boxes)} boxes but {len(labels)} category ids")
    unknown = sorted({str(c) for c in labels if c not in category_names})
    if unknown:
        raise ValueError(f"sample {base.key!r}: category ids {unknown} are not in category_names")
    budget = cfg.max_tokens - SPECIAL_TOKENS
    if cfg.sampling is PromptSampling.FIXED:
        return _fixed_prompt(base, boxes, labels, category_names, tokenizer, budget, cfg)

    # Positives: shuffled, kept while they fit (official check_for_positive_overflow).
    positives = list(dict.fromkeys(labels))
    positives = [positives[i] for i in rng.permutation(len(positives))]
    pos_lengths = name_lengths(tokenizer, [_clean(category_names[c]) + ". " for c in positives])
    kept_pos, used = [], 0
    for cid, n in zip(positives, pos_lengths):
        if used + n > budget:
            break
        kept_pos.append(cid)
        used += n
    overflow = positives[len(kept_pos):]

    # Negatives: drawn from all classes, positives discarded, shuffled, screened to the budget.
    all_ids = list(category_names.keys())
    full_negative = min(cfg.max_negatives, len(all_ids))
    num_drawn, mode = sample_num_negatives(rng, cfg.control_prob, full_negative)
    num_drawn = min(num_drawn, len(all_ids))
    positive_set = set(positives)
    drawn = [all_ids[i] for i in rng.choice(len(all_ids), size=num_drawn, replace=False)] if num_drawn else []
    negatives = [c for c in drawn if c not in positive_set]
    negatives = [negatives[i] for i in rng.permutation(len(negatives))]
    neg_lengths = name_lengths(tokenizer, [_clean(category_names[c]) + ". " for c in negatives])
    kept_neg, remaining = [], budget - used
    for cid, n in zip(negatives, neg_lengths):
        remaining -= n
        if remaining <= 0:
            break
        kept_neg.append(cid)

    order = kept_neg + kept_pos
    order = [order[i] for i in rng.permutation(len(order))]
    prompt = build_prompt([category_names[c] for c in order], cfg.separator, order)
    span_of = {cid: tuple(spans[0]) for cid, spans in zip(order, prompt.tokens_positive)}

    keep = [i for i, c in enumerate(labels) if c in span_of]
    meta = dict(base.meta)
    meta.update(category_ids=[labels[i] for i in keep], prompt_category_ids=list(order),
                negative_mode=mode, num_negatives_drawn=num_drawn, overflow_category_ids=list(overflow))
    return dataclasses.replace(
        base, caption=prompt.caption, meta=meta,
        phrases=[Phrase(prompt.caption[s:e], (s, e)) for (s, e) in (span_of[c] for c in order)],
        boxes=[list(boxes[i]) for i in keep],
        tokens_positive=[[list(span_of[labels[i]])] for i in keep], scores=[])


def _fixed_prompt(base: Sample, boxes, labels, category_names: Mapping[Any, str], tokenizer, budget: int,
                  cfg: DetectionPromptConfig) -> Sample:
    """``sampling: fixed``: the whole vocabulary in its order; it must fit the token budget."""
    order = list(category_names)
    used = sum(name_lengths(tokenizer, [_clean(category_names[c]) + ". " for c in order]))
    if used > budget:
        raise ValueError(f"the fixed prompt of {len(order)} class names takes {used} tokens, more than the "
                         f"{budget} the text encoder takes; use sampling: sampled, or fewer/shorter names")
    prompt = build_prompt([category_names[c] for c in order], cfg.separator, order)
    span_of = {cid: tuple(spans[0]) for cid, spans in zip(order, prompt.tokens_positive)}
    meta = dict(base.meta)
    meta.update(category_ids=list(labels), prompt_category_ids=order, negative_mode=NegativeMode.FIXED,
                num_negatives_drawn=0, overflow_category_ids=[])
    return dataclasses.replace(
        base, caption=prompt.caption, meta=meta,
        phrases=[Phrase(prompt.caption[s:e], (s, e)) for (s, e) in (span_of[c] for c in order)],
        boxes=[list(b) for b in boxes], tokens_positive=[[list(span_of[c])] for c in labels], scores=[])


def pack_count(rng: np.random.Generator, cfg: CaptionPackingConfig) -> int:
    """How many negative captions to pack (official ``CaptionTSV.__getitem__``)."""
    number = cfg.pack_random_caption_number
    if number == 0 or rng.random() < cfg.no_random_pack_probability:
        return 0
    if rng.random() < cfg.random_pack_prob:
        return number
    return int(rng.integers(0, number))


def _with_period(caption: str) -> str:
    return caption if caption.endswith(".") else caption + "."


def pack_negative_captions(sample: Sample, other_captions: Sequence[str], tokenizer,
                           rng: np.random.Generator,
                           cfg: CaptionPackingConfig | None = None) -> Sample:
    """Pack other images' captions around ``sample.caption`` as negatives.

    ``other_captions`` is the pool to draw from (captions of other images; empty ones are
    ignored). Returns a new ``Sample`` whose ``tokens_positive`` and ``phrases`` point at the
    same words in the packed caption; ``meta["packed_negatives"]`` is the number packed and
    ``meta["positive_caption_span"]`` where the original caption now lies. With nothing packed
    the sample is returned unchanged (a copy).
    """
    cfg = cfg or CaptionPackingConfig()
    cfg.validate()
    if sample.caption is None:
        raise ValueError(f"sample {sample.key!r} has no caption to pack")
    pool = [c.strip() for c in other_captions if c and c.strip()]
    count = min(pack_count(rng, cfg), len(pool))
    negatives = [pool[i] for i in rng.choice(len(pool), size=count, replace=False)] if count else []

    if cfg.safeguard_positive_caption and negatives:
        lengths = token_lengths(tokenizer, negatives + [sample.caption], special_tokens=True)
        room = cfg.max_tokens - lengths[-1]
        kept = []
        for i in rng.permutation(len(negatives)):
            if lengths[i] < room:
                kept.append(negatives[i])
                room -= lengths[i]
        negatives = kept
    if not negatives:
        return dataclasses.replace(sample, meta=dict(sample.meta, packed_negatives=0,
                                                     positive_caption_span=[0, len(sample.caption)]))

    pieces = [None] + negatives                     # None marks the positive caption
    pieces = [pieces[i] for i in rng.permutation(len(pieces))]
    caption, start = "", 0
    for piece in pieces:
        if caption:
            caption += " "
        if piece is None:
            start = len(caption)
            caption += _with_period(sample.caption)
        else:
            caption += _with_period(piece)

    def shift(span):
        return [int(span[0]) + start, int(span[1]) + start]

    return dataclasses.replace(
        sample, caption=caption,
        tokens_positive=[[shift(s) for s in spans] for spans in sample.tokens_positive],
        phrases=[Phrase(p.text, tuple(shift(p.span))) for p in sample.phrases],
        meta=dict(sample.meta, packed_negatives=len(negatives),
                  positive_caption_span=[start, start + len(sample.caption)]))


def screen_pseudo_labels(sample: Sample, min_score: float) -> Sample:
    """FURTHER_SCREEN: keep the boxes (with their spans and scores) whose score > ``min_score``.

    The caller drops the image when no box is left (CAPTION_MIN_BOX = 1).
    """
    if not math.isfinite(min_score):
        raise ValueError(f"min_score must be finite, got {min_score}")
    if len(sample.scores) != len(sample.boxes):
        raise ValueError(f"sample {sample.key!r}: {len(sample.boxes)} boxes but {len(sample.scores)} "
                         "scores; only pseudo labels (with a score per box) can be screened")
    if len(sample.tokens_positive) != len(sample.boxes):
        raise ValueError(f"sample {sample.key!r}: {len(sample.boxes)} boxes but "
                         f"{len(sample.tokens_positive)} tokens_positive entries")
    keep = [i for i, s in enumerate(sample.scores) if s > min_score]
    return dataclasses.replace(
        sample, boxes=[list(sample.boxes[i]) for i in keep],
        tokens_positive=[[list(s) for s in sample.tokens_positive[i]] for i in keep],
        scores=[float(sample.scores[i]) for i in keep], meta=dict(sample.meta))


def unlabelled_phrase_spans(sample: Sample) -> list[list[int]]:
    """The ``[begin, end)`` spans of ``sample.phrases`` that overlap no box's ``tokens_positive``.

    For a pseudo-labelled caption these are the phrases the teacher found no confident box for:
    their object is usually in the image, so their tokens are unknown rather than negative.
    Order follows ``sample.phrases``; empty when every phrase is grounded or there are none.
    """
    grounded = [(int(s), int(e)) for spans in sample.tokens_positive for s, e in spans]
    return [[int(p.span[0]), int(p.span[1])] for p in sample.phrases
            if not any(s < p.span[1] and p.span[0] < e for s, e in grounded)]
