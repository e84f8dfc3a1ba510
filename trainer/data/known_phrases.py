"""Pseudo labels of classes the gold sets already label (``known_phrases: ignore`` of a pseudo source).

A user knows the label set of their detection data; the teacher's value is the vocabulary beyond
it. ``drop_known_labels`` drops the pseudo boxes whose phrase names a class of ``known_names``
and ``known_phrase_spans`` gives the spans of those phrases, whose tokens then take no token loss
(the object is in the image, unlabelled): the pseudo labels teach only the words the gold sets
never name, and the gold sets teach the rest with their clean boxes. Not in the official code,
which trains on every pseudo box.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from stages.schema import Sample

__all__ = ["names_a_class", "drop_known_labels", "known_phrase_spans"]

_WORD = re.compile(r"[a-z0-9]+")


def _name_words(names: Sequence[str]) -> list[tuple[str, ...]]:
    return [tuple(_WORD.findall(n.lower())) for n in names if _WORD.search(n.lower())]


def names_a_class(text: str, names: Sequence[str]) -> bool:
    """Whether ``text`` names one of ``names``: the name's words appear in it as whole words, in
    order, case-insensitive, the last one also with a plural "s" or "es" ("two red Circles" names
    "circle", "traffic lights" names "traffic_light"; "circular" and "encircle" name nothing)."""
    words = _WORD.findall(text.lower())
    for name in _name_words(names):
        n = len(name)
        for i in range(len(words) - n + 1):
            if words[i:i + n - 1] == list(name[:-1]) and words[i + n - 1] in (
                    name[-1], name[-1] + "s", name[-1] + "es"):
                return True
    return False


def drop_known_labels(sample: Sample, known_names: Sequence[str]) -> Sample:
    """The pseudo boxes (with their spans and scores) whose phrase names no class of
    ``known_names``; a box's phrase is the caption text of its ``tokens_positive``. The caller
    skips the image when no box is left, and ``known_phrase_spans`` gives the tokens to ignore."""
    caption = sample.caption or ""
    keep = [i for i, spans in enumerate(sample.tokens_positive)
            if not any(names_a_class(caption[int(s):int(e)], known_names) for s, e in spans)]
    scores = [float(sample.scores[i]) for i in keep] if sample.scores else []
    return dataclasses.replace(
        sample, boxes=[list(sample.boxes[i]) for i in keep],
        tokens_positive=[[list(s) for s in sample.tokens_positive[i]] for i in keep],
        scores=scores, meta=dict(sample.meta))


def known_phrase_spans(sample: Sample, known_names: Sequence[str]) -> list[list[int]]:
    """The ``[begin, end)`` spans of ``sample.phrases`` that name a class of ``known_names``
    (order of ``sample.phrases``): with their boxes dropped, their objects are still in the image,
    so their tokens are neither positive nor negative anywhere."""
    return [[int(p.span[0]), int(p.span[1])] for p in sample.phrases if names_a_class(p.text, known_names)]
