"""Ingest: validate each image-caption pair, drop the bad ones with a reason.

Per kept sample, in this order (the first failing check gives the drop reason):

1. caption (cheap, so a sample with a bad caption never costs an image decode):
   ``raw_caption`` missing -> ``NO_CAPTION``; not UTF-8 -> ``CAPTION_DECODE_ERROR``; a leading
   byte-order mark is removed and the text stripped; empty -> ``NO_CAPTION``; more than
   ``max_caption_chars`` characters -> ``CAPTION_TOO_LONG``. ``caption`` holds the stripped
   text (also for ``CAPTION_TOO_LONG``, so the stats show its length).
2. image header: missing -> ``NO_IMAGE``; zero bytes, not a JPEG/PNG/WebP, unreadable header
   -> ``DECODE_ERROR``; ``width * height > max_pixels`` -> ``DECOMPRESSION_BOMB`` (checked on
   the header, before any pixel is decoded; PIL's own ``DecompressionBombError`` and
   ``DecompressionBombWarning`` map there too).
3. size on the header: shorter side < ``min_size`` -> ``TOO_SMALL``; longer side >
   ``max_size`` -> ``TOO_LARGE`` (both are independent of EXIF orientation, so they are checked
   before decoding; ``width``/``height`` then hold the header size).
4. full decode (``img.load()``): any failure, a truncated file included, -> ``DECODE_ERROR``.
   ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` must be False; the stage refuses to run otherwise.
5. ``width``/``height`` = the size after EXIF orientation (orientations 5-8 swap them).

The image bytes are never modified or re-encoded. Only JPEG (MPO too), PNG and WebP are opened:
other formats are refused without invoking their PIL plugins (some of which run external
programs, e.g. EPS via Ghostscript).

PIL's global ``Image.MAX_IMAGE_PIXELS`` still applies inside PIL: to accept images above
89,478,485 pixels, raise it as well as ``max_pixels``.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from PIL import Image, ImageFile, UnidentifiedImageError

from stages.base import BaseStage, Resources
from stages.schema import DropReason, Sample

__all__ = ["IngestConfig", "Ingest", "EXIF_ORIENTATION_TAG"]

EXIF_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_FORMATS = ("JPEG", "PNG", "WEBP")          # JPEG also opens MPO (multi-picture JPEG)


@dataclass
class IngestConfig:
    min_size: int = 32                  # shorter side, pixels
    max_size: int = 10000               # longer side, pixels
    max_pixels: int = 89_478_485        # width * height above this: a decompression bomb
    max_caption_chars: int = 1000       # characters of the stripped caption
    resources: Resources = field(default_factory=Resources)   # actors 0: inside the read task

    def validate(self) -> None:
        """Raise ValueError naming the field (``core.config`` calls this on load)."""
        for name in ("min_size", "max_size", "max_pixels", "max_caption_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) is larger than max_size "
                             f"({self.max_size}); lower min_size or raise max_size")


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    width, height = img.size
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION_TAG)
    except Exception:  # a broken EXIF block is metadata trouble, not a bad image
        orientation = None
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


class Ingest(BaseStage):
    """Decode and validate; see the module docstring for the checks and their order."""

    name: ClassVar[str] = "ingest"
    config_class: ClassVar[type] = IngestConfig
    config: IngestConfig

    def __init__(self, config: IngestConfig | None = None) -> None:
        config = config if config is not None else IngestConfig()
        config.validate()
        super().__init__(config)

    def setup(self) -> None:
        self._check_pil()
        super().setup()

    @staticmethod
    def _check_pil() -> None:
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            raise RuntimeError(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process (some import set "
                "it); the ingest stage needs it False so truncated images are dropped, not "
                "kept. Find the code that sets it and remove that, or run ingest in its own "
                "worker process.")

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        self._check_pil()
        return super().__call__(batch)

    def process(self, sample: Sample) -> None:
        if not self._check_caption(sample):
            return
        self._check_image(sample)

    def _check_caption(self, sample: Sample) -> bool:
        raw = sample.raw_caption
        if raw is None:
            sample.drop(DropReason.NO_CAPTION, "no KEY.txt member")
            return False
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            sample.drop(DropReason.CAPTION_DECODE_ERROR, f"caption is not UTF-8: {exc}")
            return False
        text = text.removeprefix("\ufeff").strip()
        sample.caption = text
        if not text:
            sample.drop(DropReason.NO_CAPTION, "empty or whitespace-only caption")
            return False
        if len(text) > self.config.max_caption_chars:
            sample.drop(DropReason.CAPTION_TOO_LONG, f"{len(text)} characters > "
                        f"max_caption_chars {self.config.max_caption_chars}")
            return False
        return True

    def _check_image(self, sample: Sample) -> None:
        cfg = self.config
        data = sample.image
        if data is None:
            sample.drop(DropReason.NO_IMAGE, "no image bytes")
            return
        if len(data) == 0:
            sample.drop(DropReason.DECODE_ERROR, f"zero-byte image ({sample.image_ext})")
            return
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data), formats=_FORMATS)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                sample.drop(DropReason.DECOMPRESSION_BOMB, str(exc))
                return
            except UnidentifiedImageError:
                sample.drop(DropReason.DECODE_ERROR, f"not a JPEG, PNG or WebP image "
                            f"({len(data)} bytes, extension {sample.image_ext!r})")
                return
            except Exception as exc:
                sample.drop(DropReason.DECODE_ERROR, f"header: {type(exc).__name__}: {exc}")
                return
            with img:
                width, height = img.size
                if width * height > cfg.max_pixels:
                    sample.width, sample.height = width, height
                    sample.drop(DropReason.DECOMPRESSION_BOMB, f"{width}x{height} = "
                                f"{width * height} pixels > max_pixels {cfg.max_pixels}")
                    return
                if min(width, height) < cfg.min_size:
                    sample.width, sample.height = width, height
                    sample.drop(DropReason.TOO_SMALL, f"{width}x{height}: shorter side < "
                                f"min_size {cfg.min_size}")
                    return
                if max(width, height) > cfg.max_size:
                    sample.width, sample.height = width, height
                    sample.drop(DropReason.TOO_LARGE, f"{width}x{height}: longer side > "
                                f"max_size {cfg.max_size}")
                    return
                try:
                    img.load()
                except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                    sample.drop(DropReason.DECOMPRESSION_BOMB, str(exc))
                    return
                except Exception as exc:
                    sample.drop(DropReason.DECODE_ERROR, f"decode: {type(exc).__name__}: {exc}")
                    return
                sample.width, sample.height = _oriented_size(img)


STAGE = Ingest      # found by stages.registry under the module's name
