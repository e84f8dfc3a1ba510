"""The grounding sample: the one schema every stage, reader and writer speaks (DESIGN.md).

A ``Sample`` flows through every stage of the DAG. Stages never remove samples from a batch:
a stage that rejects one sets ``status = DROPPED`` with a reason from ``DropReason`` and later
stages pass it through untouched. So the writer sees every attempted sample, and
``read = kept + dropped`` holds by construction.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(str, enum.Enum):
    KEPT = "kept"
    DROPPED = "dropped"


class DropReason(str, enum.Enum):
    """The fixed vocabulary of reasons a sample is not written (stats group by these)."""
    NO_IMAGE = "no_image"                  # no .jpg/.jpeg/.png/.webp member for the key
    DECODE_ERROR = "decode_error"          # not an image, truncated, zero bytes
    DECOMPRESSION_BOMB = "decompression_bomb"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    NO_CAPTION = "no_caption"              # missing, empty or whitespace-only caption
    CAPTION_DECODE_ERROR = "caption_decode_error"  # caption bytes are not UTF-8
    CAPTION_TOO_LONG = "caption_too_long"
    UNSAFE_NAME = "unsafe_name"            # tar member that escapes the directory / bad key
    NO_PHRASES = "no_phrases"
    NO_BOXES = "no_boxes"
    STAGE_ERROR = "stage_error"            # a stage raised on this sample (bug or odd input)


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class UnlabelledPhrases(str, enum.Enum):
    """What the student's token loss makes of a pseudo caption's phrases that kept no box."""
    NEGATIVE = "negative"   # official: their tokens are negatives at every anchor
    IGNORE = "ignore"       # their tokens take no token loss (the teacher missed them: unknown)


@dataclass
class Phrase:
    text: str
    span: tuple[int, int]          # [start, end) character offsets into the caption

    def to_json(self) -> dict:
        return {"text": self.text, "span": [int(self.span[0]), int(self.span[1])]}


@dataclass
class Sample:
    """One image-caption pair on its way through the DAG.

    ``image`` holds the original bytes (never re-encoded) and ``image_ext`` their extension.
    ``raw_caption`` is the caption as read (bytes); ``ingest`` decodes it into ``caption``.
    Sizes are of the stored image after EXIF orientation.
    """
    key: str
    input_shard: str
    source: str = ""
    image: bytes | None = None
    image_ext: str | None = None
    raw_caption: bytes | None = None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)   # the img2dataset KEY.json, if any
    width: int | None = None
    height: int | None = None
    phrases: list[Phrase] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)          # xyxy, absolute pixels
    tokens_positive: list[list[list[int]]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    labeler: dict[str, Any] | None = None
    status: Status = Status.KEPT
    drop_reason: DropReason | None = None
    drop_detail: str = ""          # human-readable detail (exception text), stats only

    @property
    def kept(self) -> bool:
        return self.status is Status.KEPT

    def drop(self, reason: DropReason, detail: str = "") -> None:
        """Mark dropped; the first reason wins and the heavy payload is released."""
        if self.status is Status.DROPPED:
            return
        self.status = Status.DROPPED
        self.drop_reason = reason
        self.drop_detail = detail[:500]
        self.image = None

    def to_record(self) -> dict[str, Any]:
        """The ``KEY.json`` of an output shard (DESIGN.md, "The grounding sample")."""
        record: dict[str, Any] = {
            "key": self.key,
            "source": self.source,
            "caption": self.caption,
            "width": self.width,
            "height": self.height,
            "phrases": [p.to_json() for p in self.phrases],
            "boxes": [[float(v) for v in b] for b in self.boxes],
            "tokens_positive": [[[int(s), int(e)] for s, e in spans] for spans in self.tokens_positive],
        }
        if self.scores:
            record["scores"] = [float(s) for s in self.scores]
        if self.labeler is not None:
            record["labeler"] = self.labeler
        return record

    def stats_row(self) -> dict[str, Any]:
        """One Parquet row (DESIGN.md, "Output layout and statistics")."""
        return {
            "key": self.key,
            "input_shard": self.input_shard,
            "status": self.status.value,
            "drop_reason": self.drop_reason.value if self.drop_reason else None,
            "caption_chars": len(self.caption) if self.caption is not None else None,
            "n_phrases": len(self.phrases),
            "n_boxes": len(self.boxes),
            "max_score": max(self.scores) if self.scores else None,
            "mean_score": sum(self.scores) / len(self.scores) if self.scores else None,
            "width": self.width,
            "height": self.height,
        }
