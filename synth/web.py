"""Seeded img2dataset-style web shards for tests, the demo and benchmarks.

``write_web_shards(out_dir, n_shards, samples_per_shard, seed=0, bad_samples=True)`` writes
``00000.tar``, ``00001.tar``, ... into ``out_dir`` (a local directory) in img2dataset's layout
(``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.json``; keys ``SSSSSIIII``: shard number, then the
index in the shard) and returns ``{(shard, key): Expected}`` for every sample it wrote. ``shard``
is the shard's name as the pipeline gives it to ``read_shard`` (the file name without
``.tar``: ``"00000"``), ``key`` the ``Sample.key`` that ``read_shard`` gives the sample: the input
key itself, except for the member named ``../evil.jpg``, whose key ``../evil`` reads as
``___evil``. (Keyed by the pair, not the key alone, because a sample's identity in the stats
Parquet is ``(input_shard, key)``.)

``Expected.reason`` is what the ingest + noun_phrases stages with their DEFAULT configs must
decide (``None``: kept) and ``Expected.size`` the (width, height) after EXIF orientation of a
kept sample. Normal samples are natural English captions (``make_captions``) with small images
of coloured shapes in JPEG, PNG or WebP; all of them are kept.

With ``bad_samples`` the first shard also holds one sample of each awkward case (``CASES``):
truncated JPEG, zero-byte image, non-image bytes, a decompression bomb (a real PNG of
20000x20000 1-bit pixels, 48 KB on disk), a 2x2 image, a 10001x40 image, CMYK JPEG,
grayscale JPEG, RGBA PNG, palette PNG, WebP, an EXIF-rotated JPEG (orientation 6), an
unparsable KEY.json (kept: meta becomes {}), empty, whitespace, missing, overlong and
invalid-UTF-8 captions, a caption whose noun chunks are all block-listed, a key without an
image, a member ``../evil.jpg`` and a symlink member.

Everything is deterministic in ``seed``: the same call writes byte-identical tars.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from stages.schema import DropReason

__all__ = ["Expected", "CASES", "write_web_shards", "make_captions", "make_image",
           "bomb_png", "shard_name"]


@dataclass(frozen=True)
class Expected:
    shard: str                              # "00000" (the file 00000.tar)
    reason: DropReason | None               # None: kept by ingest + noun_phrases
    size: tuple[int, int] | None = None     # (width, height) after EXIF orientation, if kept
    case: str = "normal"                    # which case of CASES, for readable test failures


# ---------------------------------------------------------------------------- captions
_COLORS = ["red", "blue", "green", "yellow", "brown", "black", "white", "orange", "purple",
           "gray", "pink"]
_ADJS = ["small", "large", "old", "young", "wooden", "shiny", "tall", "little", "fluffy",
         "striped", "happy", "wet"]
_AGENTS = ["dog", "cat", "horse", "bird", "man", "woman", "child", "girl", "boy", "cow",
           "puppy", "chef", "cyclist", "fisherman"]
_AGENTS_PLURAL = ["dogs", "cats", "horses", "birds", "men", "women", "children", "girls",
                  "boys", "cows", "tourists", "students"]
_OBJECTS = ["ball", "kite", "umbrella", "bicycle", "car", "bench", "book", "cup", "hat",
            "boat", "chair", "table", "bag", "guitar", "frisbee", "lamp", "bottle", "basket",
            "skateboard", "suitcase"]
_OBJECTS_PLURAL = ["apples", "flowers", "leaves", "books", "candles", "balloons", "shells",
                   "plates", "pillows", "cookies"]
_PLACES = ["beach", "park", "street", "field", "kitchen", "garden", "river", "forest",
           "road", "lake", "market", "station", "bridge", "meadow"]
_VERBS = ["chasing", "holding", "carrying", "riding", "looking at", "standing near",
          "playing with", "pushing", "sitting next to", "walking past"]
_PREPS = ["on", "in", "near", "beside", "across", "behind"]
_NUMBERS = ["two", "three", "four", "several", "a few"]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _caption(rng: random.Random) -> str:
    c = rng.choice
    kind = rng.randrange(6)
    if kind == 0:
        return (f"{_a(c(_COLORS))} {c(_AGENTS)} {c(_VERBS)} {_a(c(_COLORS))} {c(_OBJECTS)} "
                f"{c(_PREPS)} the {c(_PLACES)}")
    if kind == 1:
        return f"{c(_NUMBERS)} {c(_AGENTS_PLURAL)} {c(_VERBS)} {_a(c(_OBJECTS))} in the {c(_PLACES)}"
    if kind == 2:
        return f"{_a(c(_ADJS))} {c(_OBJECTS)} on {_a(c(_COLORS))} {c(_OBJECTS)}"
    if kind == 3:
        return (f"{c(_COLORS)} {c(_OBJECTS_PLURAL)} in {_a(c(_ADJS))} {c(_OBJECTS)} next to "
                f"{_a(c(_OBJECTS))}")
    if kind == 4:
        return (f"{_a(c(_ADJS))} {c(_AGENTS)} with {_a(c(_COLORS))} {c(_OBJECTS)} "
                f"{c(_PREPS)} the {c(_PLACES)}")
    return (f"The {c(_AGENTS)} is {c(_VERBS)} the {c(_COLORS)} {c(_OBJECTS)} while "
            f"{c(_NUMBERS)} {c(_AGENTS_PLURAL)} watch from the {c(_PLACES)}.")


def make_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` natural English captions (each has noun phrases spaCy finds), seeded."""
    rng = random.Random(f"captions-{seed}")
    return [_caption(rng) for _ in range(n)]


# ---------------------------------------------------------------------------- images
def _color(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _draw(rng: random.Random, mode: str, size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, _color(rng))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w - 1, x0 + rng.randint(1, w)), min(h - 1, y0 + rng.randint(1, h))
        box = (x0, y0, max(x0, x1), max(y0, y1))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=_color(rng))
    if mode == "RGBA":
        img.putalpha(Image.linear_gradient("L").resize(size))
        return img
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return img.convert(mode) if mode != "RGB" else img


def make_image(rng: random.Random, fmt: str = "JPEG", size: tuple[int, int] = (96, 64),
               mode: str = "RGB", exif_orientation: int | None = None) -> bytes:
    """Encoded bytes of a picture of coloured shapes."""
    img = _draw(rng, mode, size)
    buf = io.BytesIO()
    kwargs: dict = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    if fmt == "JPEG":
        kwargs["quality"] = 85
    elif fmt == "WEBP":
        kwargs.update(quality=80, method=0)
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


@functools.lru_cache(maxsize=2)
def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit grayscale PNG of ``width x height`` black pixels: tiny on disk, huge decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)          # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


# ---------------------------------------------------------------------------- shards
def shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", *, symlink_to: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    if symlink_to:
        info.type, info.linkname = tarfile.SYMTYPE, symlink_to
        tar.addfile(info)
        return
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _meta(key: str, caption: str | None, image: bytes | None, size) -> bytes:
    meta = {
        "url": f"https://images.example.com/{key}.jpg", "key": key, "status": "success",
        "error_message": None, "caption": caption,
        "width": size[0] if size else None, "height": size[1] if size else None,
        "original_width": size[0] if size else None, "original_height": size[1] if size else None,
        "exif": None, "sha256": hashlib.sha256(image).hexdigest() if image else None,
    }
    return json.dumps(meta, sort_keys=True).encode()


# (case name, expected reason): the awkward samples of the first shard, in this order.
CASES: tuple[tuple[str, DropReason | None], ...] = (
    ("truncated_jpeg", DropReason.DECODE_ERROR),
    ("zero_byte_image", DropReason.DECODE_ERROR),
    ("not_an_image", DropReason.DECODE_ERROR),
    ("decompression_bomb", DropReason.DECOMPRESSION_BOMB),
    ("tiny_2x2", DropReason.TOO_SMALL),
    ("too_wide_10001x40", DropReason.TOO_LARGE),
    ("cmyk_jpeg", None),
    ("grayscale_jpeg", None),
    ("rgba_png", None),
    ("palette_png", None),
    ("webp", None),
    ("exif_rotated_jpeg", None),
    ("bad_json", None),
    ("empty_caption", DropReason.NO_CAPTION),
    ("whitespace_caption", DropReason.NO_CAPTION),
    ("missing_caption", DropReason.NO_CAPTION),
    ("overlong_caption", DropReason.CAPTION_TOO_LONG),
    ("invalid_utf8_caption", DropReason.CAPTION_DECODE_ERROR),
    ("no_phrases_caption", DropReason.NO_PHRASES),
    ("no_image", DropReason.NO_IMAGE),
    ("escaping_member", DropReason.UNSAFE_NAME),
    ("symlink_member", DropReason.UNSAFE_NAME),
)
NO_PHRASES_CAPTION = "a way of life"          # chunks "a way" and "life": both block-listed
ESCAPING_MEMBER = "../evil.jpg"
ESCAPING_KEY = "___evil"                      # shards.output_key("../evil")


def _write_case(tar: tarfile.TarFile, case: str, key: str, rng: random.Random,
                caption: str) -> tuple[str, tuple[int, int] | None]:
    """Write one awkward sample; return (its key as read back, its expected kept size)."""
    size = (rng.randint(48, 128), rng.randint(48, 128))
    img_name, image, text, meta = f"{key}.jpg", None, caption.encode(), None
    expected_size = None
    if case == "truncated_jpeg":
        full = make_image(rng, "JPEG", (160, 120), "RGB")
        image = full[: len(full) * 6 // 10]
    elif case == "zero_byte_image":
        image = b""
    elif case == "not_an_image":
        image = b"<html><body>404 Not Found</body></html>\n"
    elif case == "decompression_bomb":
        img_name, image = f"{key}.png", bomb_png()
    elif case == "tiny_2x2":
        img_name, image = f"{key}.png", make_image(rng, "PNG", (2, 2))
    elif case == "too_wide_10001x40":
        img_name, image = f"{key}.png", make_image(rng, "PNG", (10001, 40), "1")
    elif case == "cmyk_jpeg":
        image, expected_size = make_image(rng, "JPEG", size, "CMYK"), size
    elif case == "grayscale_jpeg":
        image, expected_size = make_image(rng, "JPEG", size, "L"), size
    elif case == "rgba_png":
        img_name, image, expected_size = f"{key}.png", make_image(rng, "PNG", size, "RGBA"), size
    elif case == "palette_png":
        img_name, image, expected_size = f"{key}.png", make_image(rng, "PNG", size, "P"), size
    elif case == "webp":
        img_name, image, expected_size = f"{key}.webp", make_image(rng, "WEBP", size), size
    elif case == "exif_rotated_jpeg":
        image = make_image(rng, "JPEG", (120, 80), exif_orientation=6)
        expected_size = (80, 120)
    elif case == "bad_json":
        image, expected_size, meta = make_image(rng, "JPEG", size), size, b'{"url": "http://'
    elif case == "empty_caption":
        text = b""
    elif case == "whitespace_caption":
        text = b" \t\n  \r\n"
    elif case == "missing_caption":
        text = None
    elif case == "overlong_caption":
        words = " and ".join(make_captions(60, seed=rng.randrange(1 << 30)))
        text = words.encode()
    elif case == "invalid_utf8_caption":
        text = b"a red \xff\xfe bus on the street"
    elif case == "no_phrases_caption":
        text = NO_PHRASES_CAPTION.encode()
    elif case == "no_image":
        pass
    elif case == "escaping_member":
        _member(tar, ESCAPING_MEMBER, make_image(rng, "JPEG", size))
        return ESCAPING_KEY, None
    elif case == "symlink_member":
        _member(tar, f"{key}.jpg", symlink_to="/etc/passwd")
        _member(tar, f"{key}.txt", text)
        return key, None
    else:  # pragma: no cover - CASES and this function are edited together
        raise ValueError(f"unknown case {case!r}")
    if image is None and case not in ("no_image",):
        image = make_image(rng, "JPEG", size)
    if image is not None:
        _member(tar, img_name, image)
    if text is not None:
        _member(tar, f"{key}.txt", text)
    _member(tar, f"{key}.json", meta if meta is not None else _meta(key, caption, image, size))
    return key, expected_size


def write_web_shards(out_dir: str | Path, n_shards: int, samples_per_shard: int, seed: int = 0,
                     bad_samples: bool = True) -> dict[tuple[str, str], Expected]:
    """Write ``n_shards`` img2dataset-style shards; return ``{(shard, key): Expected}``.

    See the module docstring. ``bad_samples`` adds the ``CASES`` to the first shard (on top of
    its ``samples_per_shard`` normal samples).
    """
    if n_shards < 1 or samples_per_shard < 0:
        raise ValueError(f"write_web_shards: need n_shards >= 1 and samples_per_shard >= 0, got "
                         f"{n_shards} and {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = len(CASES) if bad_samples else 0
    digits = max(4, len(str(samples_per_shard + extra - 1)))
    expected: dict[tuple[str, str], Expected] = {}
    for s in range(n_shards):
        name = shard_name(s)
        stem = name[: -len(".tar")]
        rng = random.Random(f"{seed}-{s}")
        captions = make_captions(samples_per_shard + extra, seed=seed * 100_003 + s)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(samples_per_shard):
                key = f"{s:05d}{i:0{digits}d}"
                size = (rng.randint(40, 160), rng.randint(40, 160))
                fmt, ext = rng.choices([("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")],
                                       weights=[6, 3, 1])[0]
                image = make_image(rng, fmt, size)
                _member(tar, f"{key}.{ext}", image)
                _member(tar, f"{key}.txt", captions[i].encode())
                _member(tar, f"{key}.json", _meta(key, captions[i], image, size))
                expected[(stem, key)] = Expected(stem, None, size)
            if bad_samples and s == 0:
                for j, (case, reason) in enumerate(CASES):
                    i = samples_per_shard + j
                    key = f"{s:05d}{i:0{digits}d}"
                    read_key, size = _write_case(tar, case, key, rng, captions[i])
                    expected[(stem, read_key)] = Expected(stem, reason, size, case)
        (out / name).write_bytes(buf.getvalue())
    return expected
