"""Gallery (``pipeline show``): render pseudo-labelled samples as a static HTML page.

Output shards are read back by ``pipeline.storage.iter_output_samples`` (``Sample`` s, through
``Sample.from_record``); files are written whole through ``core.storage.Folder``. Rendering
works on the canonical record (``Sample.to_record()``):


- ``draw_sample(record, image_bytes, max_side=None) -> PIL.Image``: the image after EXIF
  orientation (the frame the boxes are in), every box in its phrase's colour with a label
  ``"phrase 0.82"``; line width and font size grow with the image so both stay legible.
- ``write_gallery(samples, out_dir, n=24, seed=0, ...) -> dict``: ``out_dir/index.html`` (a grid
  of cards: the drawn PNG, the caption with each grounded phrase highlighted in its box colour,
  the scores, the key, the source and the labeler) and ``out_dir/images/NNN-KEY.png``. The ``n``
  samples are the ones with the smallest ``sha256(seed, shard name, key)``: the same shards and
  seed give the same gallery whatever the order the shards are listed in.
- ``gallery_from_shards(shards, out_dir, storage_options=None, ...) -> dict``: both together.

Every piece of text from a record (captions are untrusted web text) goes through ``html.escape``.
"""
from __future__ import annotations

import colorsys
import hashlib
import heapq
import html
import io
import os
import re
from typing import Any, Iterable

from PIL import Image, ImageDraw, ImageFont, ImageOps

from core.storage import Folder
from pipeline.storage import iter_output_samples
from stages.readers.output import filter_scores
from stages.schema import Sample, is_finite_number

__all__ = ["phrase_groups", "draw_sample", "write_gallery", "gallery_from_shards"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Sasha Trubetskoy's distinct colours (light ones last); more phrases get golden-ratio hues.
_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
            (128, 0, 0), (128, 128, 0), (0, 0, 128), (255, 225, 25), (250, 190, 212),
            (220, 190, 255), (170, 255, 195), (255, 215, 180)]


# ------------------------------------------------------------------------------------ phrases
def _color(index: int) -> tuple[int, int, int]:
    if index < len(_PALETTE):
        return _PALETTE[index]
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def phrase_groups(record: dict) -> tuple[list[int], list[dict[str, Any]]]:
    """Which phrase each box grounds: ``(group of each box, groups)``.

    A group is a record phrase (``text``, ``spans``) or, for a box whose spans are not exactly
    one phrase's span (several spans, or a span no phrase has), the box's own spans (text: the
    caption pieces joined by spaces); boxes with the same spans share a group. Groups with boxes get
    distinct colours in caption order (``color``: an RGB tuple); the others ``color = None``.
    """
    caption = record["caption"]
    groups = [{"text": p["text"], "spans": [tuple(p["span"])]} for p in record.get("phrases", [])]
    by_span = {}
    for g, group in enumerate(groups):
        by_span.setdefault(group["spans"][0], g)
    extra: dict[tuple, int] = {}
    box_group = []
    for box_spans in record["tokens_positive"]:
        spans = [tuple(s) for s in box_spans]
        g = by_span.get(spans[0]) if len(spans) == 1 else None
        if g is None:
            g = extra.get(tuple(spans))
            if g is None:
                g = extra[tuple(spans)] = len(groups)
                groups.append({"text": " ".join(caption[s:e] for s, e in spans), "spans": spans})
        box_group.append(g)
    grounded = sorted(set(box_group), key=lambda g: (min(groups[g]["spans"]), g))
    for group in groups:
        group["color"] = None
    for rank, g in enumerate(grounded):
        groups[g]["color"] = _color(rank)
    return box_group, groups


# ------------------------------------------------------------------------------------ drawing
def _text_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def draw_sample(record: dict, image_bytes: bytes, max_side: int | None = None) -> Image.Image:
    """The EXIF-oriented RGB image with every box of ``record`` drawn and labelled.

    With ``max_side`` the image is first shrunk so its longer side is at most ``max_side`` (the
    boxes scaled with it). Boxes are clipped to the image; the best-scoring ones drawn last.
    """
    with Image.open(io.BytesIO(image_bytes)) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    width, height = image.size
    sx = sy = 1.0
    if max_side and max(width, height) > max_side:
        factor = max_side / max(width, height)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        sx, sy = size[0] / width, size[1] / height
        image = image.resize(size, Image.Resampling.LANCZOS)
        width, height = size
    longer = max(width, height)
    line = max(1, round(longer / 300))
    font = ImageFont.load_default(size=max(10, round(longer / 40)))
    pad = max(1, line)
    box_group, groups = phrase_groups(record)
    scores = record.get("scores")
    order = sorted(range(len(record["boxes"])), key=lambda i: (scores[i] if scores else 0.0, i))
    draw = ImageDraw.Draw(image)
    placed = []
    for i in order:
        x1, y1, x2, y2 = record["boxes"][i]
        x1, x2 = (min(max(v * sx, 0.0), width - 1.0) for v in (x1, x2))
        y1, y2 = (min(max(v * sy, 0.0), height - 1.0) for v in (y1, y2))
        color = groups[box_group[i]]["color"]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=line)
        label = _short(groups[box_group[i]]["text"])
        if scores:
            label = f"{label} {scores[i]:.2f}"
        placed.append((x1, y1, label, color))
    for x1, y1, label, color in placed:                 # labels on top of every box line
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        x = min(max(0.0, x1), max(0.0, width - w))
        y = y1 - h if y1 - h >= 0 else min(y1, max(0.0, height - h))
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=color)
        draw.text((x + pad - left, y + pad - top), label, font=font, fill=_text_color(color))
    return image


# ------------------------------------------------------------------------------------ gallery
def _rank(seed: int, shard: str, key: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{shard}\x00{key}".encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest()[:8], "big")


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def _caption_html(record: dict, groups: list[dict[str, Any]]) -> str:
    """The caption, escaped, each grounded phrase in a ``<mark>`` of its box colour."""
    caption = record["caption"]
    owner: list[Any] = [None] * len(caption)
    ranked = sorted((g for g in groups if g["color"]), key=lambda g: min(g["spans"]))
    for group in ranked + [g for g in groups if not g["color"]]:
        tag = group["color"] or "ungrounded"
        for start, end in group["spans"]:
            for c in range(start, end):
                if owner[c] is None:
                    owner[c] = tag
    parts, start = [], 0
    for c in range(1, len(caption) + 1):
        if c == len(caption) or owner[c] != owner[start]:
            text, tag = html.escape(caption[start:c]), owner[start]
            if tag is None:
                parts.append(text)
            elif tag == "ungrounded":
                parts.append(f'<span class="ungrounded">{text}</span>')
            else:
                r, g, b = tag
                parts.append(f'<mark style="background:rgba({r},{g},{b},0.3);border-bottom:'
                             f'3px solid {_hex(tag)}">{text}</mark>')
            start = c
    return "".join(parts)


def _labeler_text(labeler: Any) -> str:
    if not isinstance(labeler, dict):
        return "none (human labels)" if labeler is None else str(labeler)
    bits = [str(labeler.get("model", "?"))]
    if "min_score" in labeler:
        bits.append(f"min_score {labeler['min_score']}")
    sha = labeler.get("checkpoint_sha256")
    if isinstance(sha, str) and sha:
        bits.append(f"ckpt {sha[:12]}")
    return ", ".join(bits)


def _card(record: dict, shard: str, png: str, size: tuple[int, int], full: tuple[int, int]) -> str:
    esc = html.escape
    box_group, groups = phrase_groups(record)
    scores = record.get("scores")
    items = []
    for i in sorted(range(len(box_group)), key=lambda i: (-(scores[i] if scores else 0), i)):
        group = groups[box_group[i]]
        score = f" <b>{scores[i]:.2f}</b>" if scores else ""
        items.append(f'<li><span class="sw" style="background:{_hex(group["color"])}"></span>'
                     f'{esc(_short(group["text"], 80))}{score}</li>')
    key = str(record.get("key", ""))
    meta = [f"key <code>{esc(key)}</code>"]
    if shard:
        meta.append(f"shard <code>{esc(shard)}</code>")
    if record.get("source"):
        meta.append(f"source {esc(str(record['source']))}")
    meta.append(f"{full[0]}\u00d7{full[1]} px")
    warn = ""
    if (record["width"], record["height"]) != full:
        warn = (f'<p class="warn">record size {record["width"]}\u00d7{record["height"]} differs '
                f'from the EXIF-oriented image {full[0]}\u00d7{full[1]}: boxes may be misplaced</p>')
    labeler = esc(_labeler_text(record.get("labeler")))
    sep = " \u00b7 "
    return (f'<figure class="card" data-key="{esc(key)}">\n'
            f'<a href="{esc(png)}"><img src="{esc(png)}" width="{size[0]}" height="{size[1]}" '
            f'loading="lazy" alt="{esc(key)}"></a>\n<figcaption>\n'
            f'<p class="caption">{_caption_html(record, groups)}</p>\n{warn}'
            f'<ul class="boxes">{"".join(items) or "<li>no boxes</li>"}</ul>\n'
            f'<p class="meta">{sep.join(meta)}<br>labeler: {labeler}</p>\n'
            "</figcaption>\n</figure>")


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;background:#f4f4f4;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}.summary{color:#555;margin:0 0 1.2em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:1em}
.card{background:#fff;margin:0;padding:.6em;border-radius:6px;box-shadow:0 1px 3px #0003}
.card img{width:100%;height:auto;display:block;border-radius:3px}
.caption{font-size:1.02em;line-height:1.6;margin:.5em 0;overflow-wrap:anywhere}
mark{color:inherit;padding:0 1px;border-radius:2px}
.ungrounded{border-bottom:2px dotted #999}
.boxes{list-style:none;padding:0;margin:.3em 0;font-size:.9em;columns:2}
.sw{display:inline-block;width:.8em;height:.8em;margin-right:.35em;border-radius:2px}
.meta{color:#666;font-size:.8em;margin:.3em 0 0;overflow-wrap:anywhere}
.warn{color:#b00;font-size:.85em}"""


def write_gallery(samples: Iterable[Sample], out_dir: str | os.PathLike, *, n: int = 24,
                  seed: int = 0, title: str = "Pseudo-labelled samples",
                  min_score: float | None = None, only_with_boxes: bool = False,
                  max_side: int | None = 1024, storage_options: dict | None = None) -> dict:
    """Render ``n`` samples chosen by ``seed``; see the module docstring.

    ``samples``: ``Sample`` s with their image bytes (``input_shard``: the shard's name). Boxes below
    ``min_score`` are hidden; with ``only_with_boxes`` a sample left without a box is not
    eligible. Returns ``{index, out_dir, seen, eligible, shown, keys, images,
    boxes_below_min_score}`` (``keys``/``images`` in page order).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a positive number of samples to show, got {n!r}")
    if min_score is not None and (isinstance(min_score, bool) or not is_finite_number(min_score)):
        raise ValueError(f"min_score: expected a number or None, got {min_score!r}")
    heap: list[tuple[int, int, int]] = []        # (-rank, -arrival) of the n best so far
    kept: dict[int, tuple[dict, bytes, str]] = {}
    seen = eligible = hidden = 0
    for arrival, sample in enumerate(samples):
        shard, image = sample.input_shard, sample.image
        seen += 1
        sample, removed = filter_scores(sample, min_score)
        record = sample.to_record()
        hidden += removed
        if only_with_boxes and not record["boxes"]:
            continue
        eligible += 1
        entry = (-_rank(seed, shard, str(record.get("key", ""))), -arrival, arrival)
        if len(heap) < n:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            del kept[heapq.heapreplace(heap, entry)[2]]
        else:
            continue
        kept[arrival] = (record, image, shard)
    chosen = [kept[a] for _, _, a in sorted(heap, key=lambda e: (-e[0], -e[1]))]

    folder = Folder(os.fspath(out_dir), storage_options)
    cards, keys, images = [], [], []
    for i, (record, image_bytes, shard) in enumerate(chosen):
        key = str(record.get("key", ""))
        with Image.open(io.BytesIO(image_bytes)) as opened:
            full = ImageOps.exif_transpose(opened).size
        drawn = draw_sample(record, image_bytes, max_side=max_side)
        png = f"images/{i:03d}-{_UNSAFE.sub('_', key)[:80]}.png"
        buf = io.BytesIO()
        drawn.save(buf, format="PNG", optimize=False)
        folder.write_bytes(png, buf.getvalue())
        cards.append(_card(record, shard, png, drawn.size, full))
        keys.append(key)
        images.append(png)
    filters = [f"seed {seed}"]
    if min_score is not None:
        filters.append(f"boxes with score \u2265 {min_score}")
    if only_with_boxes:
        filters.append("samples with boxes only")
    summary_line = (f"{len(chosen)} of {eligible} eligible samples ({seen} read; "
                    f"{', '.join(filters)}). Highlighted: grounded phrases in their box colour; "
                    "dotted: phrases without a box.")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{_STYLE}\n</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p class=\"summary\">{html.escape(summary_line)}</p>\n"
            "<main class=\"grid\">\n" + "\n".join(cards) + "\n</main>\n</body>\n</html>\n")
    folder.write_bytes("index.html", page.encode("utf-8"))
    index = folder.path("index.html")
    return {"index": index, "out_dir": folder.url, "seen": seen, "eligible": eligible,
            "shown": len(chosen), "keys": keys, "images": images,
            "boxes_below_min_score": hidden}


def gallery_from_shards(shards: str | Iterable[str], out_dir: str | os.PathLike, *,
                        storage_options: dict | None = None, **options: Any) -> dict:
    """``write_gallery`` over the samples of output shards (paths or fsspec URLs); ``options``
    are ``write_gallery``'s (``n``, ``seed``, ``title``, ``min_score``, ``only_with_boxes``,
    ``max_side``). ``storage_options`` serve both the shards and ``out_dir``."""
    return write_gallery(iter_output_samples(shards, storage_options), out_dir,
                         storage_options=storage_options, **options)
