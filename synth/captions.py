"""Captions of the miniature world (``synth.world``): a scene's objects as a natural sentence.

``caption(rng, scene, cfg, objects, web)`` returns the sentence and each object's [start, end)
span, e.g. ``"a small striped red star next to a blue circle on a checkered background"``;
spatial words (``above``, ``below``) are true of the picture, size words (``small``, ``big``) of
the object. The backdrop is named ``background`` or, with ``cfg.scene_phrase_prob``,
``wall``/``floor``/``curtain`` (a noun phrase with no box). Every choice comes from ``rng``, in a
fixed order, so the same seed gives the same caption.
"""
from __future__ import annotations

import random
from typing import Any

from synth.config import WorldConfig
from synth.draw import Scene, WorldObject

__all__ = ["caption"]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(rng: random.Random, obj: WorldObject, side: int, name_colour: bool) -> str:
    words = []
    rel = max(obj.bbox[2], obj.bbox[3]) / side
    if rel < 0.22 and rng.random() < 0.5:
        words.append(rng.choice(("small", "tiny", "little")))
    elif rel > 0.45 and rng.random() < 0.5:
        words.append(rng.choice(("big", "large")))
    if obj.fill != "solid" and rng.random() < 0.8:
        words.append("striped" if obj.fill == "striped" else rng.choice(("dotted", "spotted")))
    if name_colour:
        words.append(obj.colour)
    words.append(obj.name)
    return f"{_article(words[0])} {' '.join(words)}"


def _relation(rng: random.Random, a: WorldObject, b: WorldObject) -> str:
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ay - by) > abs(ax - bx) + 8:
        return "above" if ay < by else "below"
    return rng.choice(("next to", "beside", "near"))


def caption(rng: random.Random, scene: Scene, cfg: WorldConfig, objects: list[WorldObject],
             web: bool) -> tuple[str, list[list[int]]]:
    """A sentence naming ``objects`` (in that order); returns it and each object's [start, end)."""
    side = min(scene.width, scene.height)
    texts = [_phrase(rng, o, side, not web or rng.random() < cfg.web_colour_prob) for o in objects]
    parts: list[Any] = []                # str, or int: the index of an object phrase
    n = len(objects)
    kind = rng.randrange(3)
    if n == 1:
        if kind == 2 and rng.random() >= cfg.scene_phrase_prob:     # "a drawing": a boxless phrase
            kind = 0
        parts = [[0], ["there is ", 0], ["a drawing of ", 0]][kind]
    elif n == 2 or kind == 0:
        parts = [0, f" {_relation(rng, objects[0], objects[1])} ", 1]
        rest = list(range(2, n))
        if rest:
            parts.append(", with ")
            for j, r in enumerate(rest):
                parts += ([" and "] if j else []) + [r]
            parts.append(" nearby")
    else:
        for j in range(n):
            parts += ([", " if j < n - 1 else " and "] if j else []) + [j]
    if rng.random() < 0.65:
        noun = rng.choice(("wall", "floor", "curtain")) if rng.random() < cfg.scene_phrase_prob else "background"
        prep = "in front of" if noun in ("wall", "curtain") else "on"
        parts.append(f" {prep} {_article(scene.background)} {scene.background} {noun}")
    caption, spans = "", [[0, 0] for _ in objects]
    for part in parts:
        if isinstance(part, int):
            spans[part] = [len(caption), len(caption) + len(texts[part])]
            caption += texts[part]
        else:
            caption += part
    if rng.random() < 0.5:
        caption = caption[0].upper() + caption[1:] + "."
    return caption, spans
