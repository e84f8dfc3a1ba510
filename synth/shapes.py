"""The object kinds of the miniature world, by the word captions use for them.

Each is drawn as a white (255) silhouette into an L image of size (w, h), and may return a
"detail" polygon list drawn in a contrasting shade (a flower's heart, a fish's eye). ``SHAPES``
maps the word to its ``ShapeSpec`` (drawing function, aspect ratio, rotation range).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from PIL import ImageDraw

__all__ = ["SHAPES", "ShapeSpec", "Pen"]

Pen = ImageDraw.ImageDraw


# ------------------------------------------------------------------------------- shapes
# Each draws the white (255) silhouette of the object into an L image of size (w, h), and may
# return a "detail" polygon list drawn in a contrasting shade (a flower's heart, a fish's eye).

def _circle(d: Pen, w: int, h: int) -> None:
    d.ellipse([0, 0, w - 1, h - 1], fill=255)


def _square(d: Pen, w: int, h: int) -> None:
    d.rectangle([0, 0, w - 1, h - 1], fill=255)


def _triangle(d: Pen, w: int, h: int) -> None:
    d.polygon([(w / 2, 0), (w - 1, h - 1), (0, h - 1)], fill=255)


def _regular(d: Pen, w: int, h: int, n: int, inner: float | None, phase: float) -> None:
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        r = inner if inner and k % 2 else 1.0
        a = phase + 2 * math.pi * k / steps
        pts.append((w / 2 + r * (w / 2) * math.cos(a), h / 2 + r * (h / 2) * math.sin(a)))
    d.polygon(pts, fill=255)


def _star(d: Pen, w: int, h: int) -> None:
    _regular(d, w, h, 5, 0.42, -math.pi / 2)


def _hexagon(d: Pen, w: int, h: int) -> None:
    _regular(d, w, h, 6, None, 0.0)


def _heart(d: Pen, w: int, h: int) -> None:
    pts = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append(((x + 16) / 32 * (w - 1), (12 - y) / 29 * (h - 1)))
    d.polygon(pts, fill=255)


def _cross(d: Pen, w: int, h: int) -> None:
    aw, ah = w * 0.34, h * 0.34
    d.rectangle([(w - aw) / 2, 0, (w + aw) / 2, h - 1], fill=255)
    d.rectangle([0, (h - ah) / 2, w - 1, (h + ah) / 2], fill=255)


def _diamond(d: Pen, w: int, h: int) -> None:
    d.polygon([(w / 2, 0), (w - 1, h / 2), (w / 2, h - 1), (0, h / 2)], fill=255)


def _ring(d: Pen, w: int, h: int) -> None:
    d.ellipse([0, 0, w - 1, h - 1], fill=255)
    d.ellipse([w * 0.26, h * 0.26, w * 0.74, h * 0.74], fill=0)


def _moon(d: Pen, w: int, h: int) -> None:
    d.ellipse([0, 0, w - 1, h - 1], fill=255)
    d.ellipse([w * 0.32, -h * 0.08, w * 1.25, h * 0.92], fill=0)


def _arrow(d: Pen, w: int, h: int) -> None:
    head = w * 0.4
    d.rectangle([0, h * 0.36, w - head, h * 0.64], fill=255)
    d.polygon([(w - head - 1, 0), (w - 1, h / 2), (w - head - 1, h - 1)], fill=255)


def _cloud(d: Pen, w: int, h: int) -> None:
    for cx, cy, r in ((0.28, 0.6, 0.24), (0.5, 0.42, 0.3), (0.73, 0.58, 0.25), (0.5, 0.7, 0.26)):
        d.ellipse([(cx - r) * w, (cy - r) * h * 1.15, (cx + r) * w, (cy + r) * h * 1.15], fill=255)
    d.rounded_rectangle([0.06 * w, 0.6 * h, 0.94 * w, h - 1], radius=h * 0.18, fill=255)


def _flower(d: Pen, w: int, h: int) -> list:
    r = 0.2
    for k in range(6):
        a = 2 * math.pi * k / 6
        cx, cy = 0.5 + 0.29 * math.cos(a), 0.5 + 0.29 * math.sin(a)
        d.ellipse([(cx - r) * w, (cy - r) * h, (cx + r) * w, (cy + r) * h], fill=255)
    return [("ellipse", [0.36 * w, 0.36 * h, 0.64 * w, 0.64 * h])]


def _house(d: Pen, w: int, h: int) -> list:
    d.polygon([(w / 2, 0), (w - 1, h * 0.45), (0, h * 0.45)], fill=255)
    d.rectangle([w * 0.12, h * 0.44, w * 0.88, h - 1], fill=255)
    return [("rectangle", [w * 0.42, h * 0.66, w * 0.58, h - 1])]


def _fish(d: Pen, w: int, h: int) -> list:
    d.ellipse([w * 0.18, h * 0.12, w - 1, h * 0.88], fill=255)
    d.polygon([(0, h * 0.08), (w * 0.3, h / 2), (0, h * 0.92)], fill=255)
    return [("ellipse", [w * 0.74, h * 0.34, w * 0.84, h * 0.46])]


def _leaf(d: Pen, w: int, h: int) -> list:
    xs = [k / 24 for k in range(25)]
    top = [(x * (w - 1), (0.5 - 0.5 * math.sin(math.pi * x) ** 0.8) * (h - 1)) for x in xs]
    bottom = [(x * (w - 1), (0.5 + 0.5 * math.sin(math.pi * x) ** 0.8) * (h - 1)) for x in reversed(xs)]
    d.polygon(top + bottom, fill=255)
    return [("line", [w * 0.08, h * 0.5, w * 0.92, h * 0.5])]


def _tree(d: Pen, w: int, h: int) -> list:
    d.ellipse([0, 0, w - 1, h * 0.72], fill=255)
    d.rectangle([w * 0.4, h * 0.6, w * 0.6, h - 1], fill=255)
    return [("rectangle", [w * 0.4, h * 0.7, w * 0.6, h - 1])]


@dataclass(frozen=True)
class ShapeSpec:
    draw: Callable[..., list | None]
    aspect: float = 1.0          # height / width before jitter
    max_turn: float = 20.0       # random rotation in [-max_turn, max_turn] degrees
    quarter_turns: bool = False  # also turn by 0/90/180/270 degrees (arrow direction)


SHAPES: dict[str, ShapeSpec] = {
    "circle": ShapeSpec(_circle, max_turn=0), "square": ShapeSpec(_square, max_turn=0),
    "triangle": ShapeSpec(_triangle, aspect=0.9, max_turn=12), "star": ShapeSpec(_star, max_turn=25),
    "heart": ShapeSpec(_heart, aspect=0.92, max_turn=15), "cross": ShapeSpec(_cross, max_turn=12),
    "diamond": ShapeSpec(_diamond, aspect=1.35, max_turn=0), "ring": ShapeSpec(_ring, max_turn=0),
    "hexagon": ShapeSpec(_hexagon, aspect=0.88, max_turn=0),
    "moon": ShapeSpec(_moon, max_turn=180), "arrow": ShapeSpec(_arrow, 0.55, 10, True),
    "cloud": ShapeSpec(_cloud, aspect=0.62, max_turn=5), "flower": ShapeSpec(_flower, max_turn=30),
    "house": ShapeSpec(_house, aspect=1.05, max_turn=5), "fish": ShapeSpec(_fish, 0.6, 15),
    "leaf": ShapeSpec(_leaf, aspect=0.5, max_turn=40), "tree": ShapeSpec(_tree, aspect=1.3, max_turn=5),
}
