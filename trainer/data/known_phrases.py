"""Pseudo labels of classes the gold sets already label (``known_phrases: ignore`` of a pseudo source).

A user knows the label set of their detection data; the teacher's value is the vocabulary beyond
it. ``drop_known_labels`` drops the pseudo boxes whose phrase names a class of ``known_names``
and ``known_phrase_spans`` gives the spans of those phrases, whose tokens then take no token loss
(the object is in the image, unlabelled): the pseudo labels teach only the words the gold sets
never name, and the gold sets teach the rest with their clean boxes. Not in the official code,
which trains on every pseudo box.

``novel_phrase_boxes`` serves ``max_novel_phrases`` of a pseudo source: the boxes whose phrase
names no known class, grouped by phrase. When a caption names one unfamiliar thing beside known
ones, the known phrases explain the other objects and the teacher's box for the new word is an
educated guess with one candidate left; when it names several, which box is which is a guess
among them (measured on the miniature world's teacher: rare pseudo boxes 76 % right in images
with one such phrase, 53 % with two, 40 % with three).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from stages.schema import Sample

__all__ = ["names_a_class", "known_label_indices", "drop_known_labels", "known_phrase_spans", "novel_phrase_boxes",
           "drop_boxes"]

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


def known_label_indices(sample: Sample, known_names: Sequence[str]) -> list[int]:
    """The pseudo boxes whose phrase (the caption text of its ``tokens_positive``) names a class
    of ``known_names``."""
    caption = sample.caption or ""
    return [i for i, spans in enumerate(sample.tokens_positive)
            if any(names_a_class(caption[int(s):int(e)], known_names) for s, e in spans)]


def drop_known_labels(sample: Sample, known_names: Sequence[str]) -> Sample:
    """The pseudo boxes (with their spans and scores) whose phrase names no class of
    ``known_names``. The caller skips the image when no box is left, and ``known_phrase_spans``
    gives the tokens to ignore."""
    return drop_boxes(sample, known_label_indices(sample, known_names))


def known_phrase_spans(sample: Sample, known_names: Sequence[str]) -> list[list[int]]:
    """The ``[begin, end)`` spans of ``sample.phrases`` that name a class of ``known_names``
    (order of ``sample.phrases``): with their boxes dropped, their objects are still in the image,
    so their tokens are neither positive nor negative anywhere."""
    return [[int(p.span[0]), int(p.span[1])] for p in sample.phrases if names_a_class(p.text, known_names)]


def novel_phrase_boxes(sample: Sample, known_names: Sequence[str]) -> dict[tuple[int, int], list[int]]:
    """The pseudo boxes whose phrase names no class of ``known_names`` (none named: every phrase
    is new), by phrase: {(begin, end) of the box's first span: [box indices]}, caption order."""
    caption = sample.caption or ""
    novel: dict[tuple[int, int], list[int]] = {}
    for i, spans in enumerate(sample.tokens_positive):
        if spans and not any(names_a_class(caption[int(s):int(e)], known_names) for s, e in spans):
            novel.setdefault((int(spans[0][0]), int(spans[0][1])), []).append(i)
    return dict(sorted(novel.items()))


def drop_boxes(sample: Sample, drop: Sequence[int]) -> Sample:
    """``sample`` without the boxes ``drop`` (their spans and scores go with them)."""
    gone = set(drop)
    keep = [i for i in range(len(sample.boxes)) if i not in gone]
    return dataclasses.replace(
        sample, boxes=[list(sample.boxes[i]) for i in keep],
        tokens_positive=[[list(s) for s in sample.tokens_positive[i]] for i in keep],
        scores=[float(sample.scores[i]) for i in keep] if sample.scores else [], meta=dict(sample.meta))
