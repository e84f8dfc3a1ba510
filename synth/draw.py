"""The pixels of the miniature world (``synth.world``): objects, fills, backgrounds, clutter.

Everything here is a pure function of a ``random.Random`` (and NumPy generators seeded from
it), so a scene drawn twice from the same seed is the same pixels.

- ``SHAPES`` (``synth.shapes``): the object kinds the world can hold, by the word captions use for them. Each is
  drawn as a mask (2x supersampled, then reduced), optionally rotated, so the objects are
  simple but distinct at 24-120 px: geometric shapes (``circle``, ``square``, ``triangle``,
  ``star``, ``heart``, ``cross``, ``diamond``, ``ring``, ``hexagon``, ``moon``, ``arrow``) and
  a few object-like drawings (``cloud``, ``flower``, ``house``, ``fish``, ``leaf``, ``tree``).
- ``PALETTE``: the object colours, by the word captions use for them (saturated, so they stand
  out from the muted backgrounds; a colour too close to the background is never chosen).
- ``render_object`` -> ``Sprite``: the object's colour image and mask, cropped to the mask's
  tight box (pixels with mask >= ``MASK_THRESHOLD``). Placing a sprite at ``(x, y)`` makes its
  COCO box ``[x, y, w, h]`` cover exactly the pixels ``x .. x + w - 1`` (the readers' legacy
  convention, ``stages.readers.common``).
- ``FILLS``: ``solid``, ``striped``, ``dotted`` (the last two are named in captions), each
  optionally with a darker outline.
- ``draw_background`` -> (image, pattern word): ``plain``, ``striped``, ``dotted``,
  ``checkered``, ``speckled`` or ``faded`` (a gradient), in muted colours.
- ``draw_clutter``: thin strokes in background tones (not objects, never annotated).
- ``draw_scene`` -> ``Scene``: a background, clutter and 1-N placed objects (``WorldObject``:
  class word, colour, fill, box), encoded as JPEG with a fixed quality.
"""
from __future__ import annotations

import io
import math
import random
from typing import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from synth.shapes import SHAPES, Pen

__all__ = ["PALETTE", "SHAPES", "FILLS", "BACKGROUNDS", "MASK_THRESHOLD", "Sprite", "WorldObject",
           "Scene", "render_object", "draw_background", "draw_clutter", "pick_colour", "draw_scene"]

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 205, 30),
    "green": (35, 155, 60), "blue": (35, 75, 215), "purple": (135, 55, 185),
    "pink": (240, 110, 175), "white": (250, 250, 250), "black": (25, 25, 25),
}
FILLS = ("solid", "striped", "dotted")
BACKGROUNDS = ("plain", "striped", "dotted", "checkered", "speckled", "faded")
MASK_THRESHOLD = 96          # a mask pixel at or above this belongs to the object's box
_SS = 2                      # supersampling factor of the masks
_INSIDE = [255 if v >= 250 else 0 for v in range(256)]


# ------------------------------------------------------------------------------- colours
def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """Darker (factor < 1) or lighter (factor > 1, towards white) version of a colour."""
    if factor <= 1:
        return tuple(int(c * factor) for c in rgb)
    return tuple(int(c + (255 - c) * (factor - 1)) for c in rgb)


def _distance(a, b) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def pick_colour(rng: random.Random, names: list[str], background: list[tuple[int, int, int]],
                min_distance: float = 110.0) -> str:
    """A colour name far enough from every background tone (the farthest one as a last resort)."""
    order = list(names)
    rng.shuffle(order)
    for name in order:
        if all(_distance(PALETTE[name], bg) >= min_distance for bg in background):
            return name
    return max(order, key=lambda n: min(_distance(PALETTE[n], bg) for bg in background))


# ------------------------------------------------------------------------------- objects
@dataclass
class Sprite:
    image: Image.Image           # RGB, the object's pixels
    mask: Image.Image            # L, 0 outside the object
    width: int
    height: int


def _detail(d: Pen, parts: list, colour) -> None:
    for kind, xy in parts:
        if kind == "line":
            d.line(xy, fill=colour, width=max(2, int(abs(xy[2] - xy[0]) * 0.06)))
        else:
            getattr(d, kind)(xy, fill=colour)


def render_object(rng: random.Random, shape: str, size: int, colour: str, fill: str,
                  outline: bool) -> Sprite:
    """One object, its longest side about ``size`` px, cropped to its tight box."""
    spec = SHAPES[shape]
    aspect = spec.aspect * rng.uniform(0.88, 1.12)
    w, h = (size, size * aspect) if aspect <= 1 else (size / aspect, size)
    w, h = max(4, round(w * _SS)), max(4, round(h * _SS))
    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    parts = spec.draw(md, w, h) or []
    base = PALETTE[colour]
    image = Image.new("RGB", (w, h), base)
    pen = ImageDraw.Draw(image)
    second = _shade(base, 0.62) if sum(base) > 200 else _shade(base, 1.6)
    step = max(6, int(min(w, h) / rng.uniform(4.0, 6.0)))
    if fill == "striped":
        vertical = rng.random() < 0.5
        for k in range(step // 2, max(w, h), 2 * step):
            pen.rectangle([k, 0, k + step - 1, h] if vertical else [0, k, w, k + step - 1], fill=second)
    elif fill == "dotted":
        r = step * 0.35
        for y in range(step // 2, h, step):
            for x in range(step // 2 + (y // step % 2) * step // 2, w, step):
                pen.ellipse([x - r, y - r, x + r, y + r], fill=second)
    if parts:
        _detail(pen, parts, _shade(base, 0.35) if sum(base) > 200 else _shade(base, 1.8))
    if outline:
        # erosion by a box blur: a pixel stays inside when its whole neighbourhood is inside
        inner = mask.filter(ImageFilter.BoxBlur(max(1, int(min(w, h) / 28)))).point(_INSIDE)
        edge = ImageChops.subtract(mask, inner)
        image.paste(_shade(base, 0.45) if sum(base) > 200 else _shade(base, 1.7), (0, 0), edge)
    turn = rng.uniform(-spec.max_turn, spec.max_turn) + (90 * rng.randrange(4) if spec.quarter_turns else 0)
    if turn:
        # nearest is enough at 2x: the box reduction below smooths the edges
        mask = mask.rotate(turn, resample=Image.NEAREST, expand=True)
        image = image.rotate(turn, resample=Image.NEAREST, expand=True, fillcolor=base)
    small = (max(1, round(mask.width / _SS)), max(1, round(mask.height / _SS)))
    mask = mask.resize(small, Image.BOX)
    image = image.resize(small, Image.BOX)
    inside = np.asarray(mask) >= MASK_THRESHOLD
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if not len(rows):            # cannot happen for sizes >= 8 px; kept loud if it ever does
        raise ValueError(f"render_object: {shape} at {size} px left an empty mask")
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    mask, image = mask.crop(box), image.crop(box)
    return Sprite(image=image, mask=mask, width=mask.width, height=mask.height)


# ------------------------------------------------------------------------------- backgrounds
def _muted(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation background tone."""
    grey = rng.uniform(70, 215)
    tint = [rng.uniform(-28, 28) for _ in range(3)]
    return tuple(int(min(255, max(0, grey + t))) for t in tint)


def draw_background(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, str, list]:
    """(image, pattern word, its tones) for a backdrop of ``size`` (w, h)."""
    w, h = size
    kind = rng.choice(BACKGROUNDS)
    a = _muted(rng)
    b = tuple(int(min(255, max(0, c + rng.choice((-1, 1)) * rng.uniform(22, 45)))) for c in a)
    img = Image.new("RGB", size, a)
    pen = ImageDraw.Draw(img)
    step = rng.randint(8, 22)
    if kind == "striped":
        vertical = rng.random() < 0.5
        for k in range(0, w if vertical else h, 2 * step):
            pen.rectangle([k, 0, k + step - 1, h] if vertical else [0, k, w, k + step - 1], fill=b)
    elif kind == "dotted":
        r = step * 0.3
        for y in range(step // 2, h + step, step):
            for x in range(step // 2, w + step, step):
                pen.ellipse([x - r, y - r, x + r, y + r], fill=b)
    elif kind == "checkered":
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    pen.rectangle([x, y, x + step - 1, y + step - 1], fill=b)
    elif kind == "speckled":
        gen = np.random.default_rng(rng.getrandbits(64))
        low = gen.random((max(2, h // 6), max(2, w // 6)), dtype=np.float32)
        t = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize(size, Image.BILINEAR),
                       dtype=np.float32)[..., None] / 255.0
        arr = np.asarray(a, np.float32) * (1 - t) + np.asarray(b, np.float32) * t
        img = Image.fromarray(arr.round().astype(np.uint8), "RGB")
    elif kind == "faded":
        ramp = Image.linear_gradient("L")
        turn = rng.choice((None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                           Image.Transpose.ROTATE_270))
        ramp = (ramp.transpose(turn) if turn is not None else ramp).resize(size, Image.BILINEAR)
        img = Image.composite(Image.new("RGB", size, b), img, ramp)
    return img, kind, [a, b]


def draw_clutter(rng: random.Random, img: Image.Image, tones: list, count: int) -> None:
    """``count`` thin strokes in a shade of the background (texture, not objects)."""
    pen = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(count):
        tone = _shade(rng.choice(tones), rng.choice((0.75, 1.25)))
        pts = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(rng.randint(2, 4))]
        pen.line(pts, fill=tone, width=rng.randint(1, 2))


# ------------------------------------------------------------------------------- scenes
@dataclass
class WorldObject:
    name: str                    # class word, e.g. "star"
    colour: str
    fill: str                    # solid | striped | dotted
    bbox: list[int]              # COCO xywh, legacy: covers x .. x + w - 1

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2


@dataclass
class Scene:
    width: int
    height: int
    background: str              # pattern word
    objects: list[WorldObject]
    jpeg: bytes


def _overlap_ok(a: list[int], b: list[int], limit: float) -> bool:
    ix = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    iy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0, ix) * max(0, iy)
    return inter <= limit * min(a[2] * a[3], b[2] * b[3])


def draw_scene(rng: random.Random, *, image_size: list[int], object_size: list[int],
               objects_per_image: list[int], colours: list[str], max_overlap: float, clutter: int,
               jpeg_quality: int, pick_class: Callable[[random.Random, int], str],
               forced: list[str]) -> Scene:
    """A picture of ``forced`` objects then ``pick_class`` ones, as JPEG bytes with its objects.

    Width and height are each drawn in ``image_size``; ``objects_per_image`` objects (at least
    ``len(forced)``), each a distinct (class, colour) pair, longest side in ``object_size``
    (log-uniform), boxes overlapping at most ``max_overlap`` of the smaller one; an object
    that finds no room after shrinking is left out. The first object (a forced one if any) is
    placed on an empty picture and always fits, so a scene has at least one object; a forced
    object that does not fit raises.
    """
    w, h = rng.randint(*image_size), rng.randint(*image_size)
    img, background, tones = draw_background(rng, (w, h))
    draw_clutter(rng, img, tones, rng.randint(0, clutter))
    wanted = max(len(forced), rng.randint(*objects_per_image))
    objects: list[WorldObject] = []
    used: set[tuple[str, str]] = set()
    top = min(object_size[1], int(0.7 * min(w, h)))
    for k in range(wanted):
        name = forced[k] if k < len(forced) else pick_class(rng, k)
        free = [c for c in colours if (name, c) not in used]
        if not free:
            continue
        colour = pick_colour(rng, free, tones)
        fill = rng.choices(("solid", "striped", "dotted"), weights=(3, 1, 1))[0]
        outline = rng.random() < 0.4
        placed = None
        for attempt in range(4):         # a smaller object each time the picture is crowded
            hi = max(object_size[0], int(top * 0.75 ** attempt))
            size = round(math.exp(rng.uniform(math.log(object_size[0]), math.log(hi))))
            sprite = render_object(rng, name, size, colour, fill, outline)
            if sprite.width > w or sprite.height > h:
                continue
            for _ in range(12):
                x, y = rng.randint(0, w - sprite.width), rng.randint(0, h - sprite.height)
                box = [x, y, sprite.width, sprite.height]
                if all(_overlap_ok(box, o.bbox, max_overlap) for o in objects):
                    placed = (sprite, box)
                    break
            if placed:
                break
        if placed is None:
            if k < max(1, len(forced)):  # the first object always fits an empty picture
                raise RuntimeError(f"draw_scene: could not place the {name} (object {k}) in a {w}x{h} image")
            continue
        sprite, box = placed
        img.paste(sprite.image, (box[0], box[1]), sprite.mask)
        used.add((name, colour))
        objects.append(WorldObject(name=name, colour=colour, fill=fill, bbox=box))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=jpeg_quality, subsampling=0)
    return Scene(width=w, height=h, background=background, objects=objects, jpeg=buf.getvalue())
