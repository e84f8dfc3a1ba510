"""The grounding sample: the one schema every stage, reader and writer speaks.

A ``Sample`` flows through every stage of the DAG. Stages never remove samples from a batch:
a stage that rejects one sets ``status = DROPPED`` with a reason from ``DropReason`` and later
stages pass it through untouched. So the writer sees every attempted sample, and
``read = kept + dropped`` holds by construction.

The record (``KEY.json`` of an output shard; docs/architecture.md, "The grounding sample") has
one owner: ``Sample.to_record`` writes it, ``Sample.from_record`` reads it back (after
``check_record``), and every reader of output shards goes through the pair.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

_FIX_RECORD = ("the shard was not written by stages.write.encode_shard or is damaged; rerun the "
               "pipeline for its input shard")


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


# ------------------------------------------------------------------------------- the record
def _fail(where: str, field: str, problem: str, fix: str = _FIX_RECORD) -> ValueError:
    return ValueError(f"{where}: {field}: {problem}. Fix: {fix}")


def is_finite_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _check_span(span: Any, n_chars: int, where: str, field: str) -> None:
    if (not isinstance(span, list) or len(span) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in span)
            or not 0 <= span[0] < span[1] <= n_chars):
        raise _fail(where, field, f"expected a [start, end) span inside the caption ({n_chars} "
                    f"characters), got {span!r:.60}")


def check_record(record: Any, where: str) -> None:
    """Raise ValueError naming ``where`` and the field when a ``KEY.json`` record is malformed."""
    if not isinstance(record, dict):
        raise _fail(where, "(record)", f"expected a JSON object, got {type(record).__name__}")
    caption = record.get("caption")
    if not isinstance(caption, str):
        raise _fail(where, "caption", f"expected a string, got {caption!r:.60}")
    for name in ("width", "height"):
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _fail(where, name, f"expected a positive integer, got {value!r}")
    phrases = record.get("phrases", [])
    if not isinstance(phrases, list):
        raise _fail(where, "phrases", f"expected a list, got {type(phrases).__name__}")
    for i, phrase in enumerate(phrases):
        if not isinstance(phrase, dict) or not isinstance(phrase.get("text"), str):
            raise _fail(where, f"phrases[{i}]", f"expected {{text, span}}, got {phrase!r:.60}")
        _check_span(phrase.get("span"), len(caption), where, f"phrases[{i}].span")
    boxes = record.get("boxes")
    if not isinstance(boxes, list):
        raise _fail(where, "boxes", f"expected a list of [x1, y1, x2, y2], got {boxes!r:.60}")
    for i, box in enumerate(boxes):
        if not isinstance(box, list) or len(box) != 4 or not all(is_finite_number(v) for v in box):
            raise _fail(where, f"boxes[{i}]", f"expected 4 finite numbers, got {box!r:.60}")
        if box[2] < box[0] or box[3] < box[1]:
            raise _fail(where, f"boxes[{i}]", f"x2 < x1 or y2 < y1 in {box!r}",
                        "boxes are absolute [x1, y1, x2, y2]; " + _FIX_RECORD)
    spans = record.get("tokens_positive")
    if not isinstance(spans, list) or len(spans) != len(boxes):
        raise _fail(where, "tokens_positive", f"expected one list of spans per box "
                    f"({len(boxes)}), got {spans!r:.60}")
    for i, box_spans in enumerate(spans):
        if not isinstance(box_spans, list) or not box_spans:
            raise _fail(where, f"tokens_positive[{i}]", "expected a non-empty list of spans")
        for j, span in enumerate(box_spans):
            _check_span(span, len(caption), where, f"tokens_positive[{i}][{j}]")
    if "scores" in record:
        scores = record["scores"]
        if (not isinstance(scores, list) or len(scores) != len(boxes)
                or not all(is_finite_number(s) for s in scores)):
            raise _fail(where, "scores", f"expected one finite number per box ({len(boxes)}), "
                        f"got {scores!r:.60}")


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
        """The ``KEY.json`` of an output shard (the inverse of ``from_record``)."""
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

    @classmethod
    def from_record(cls, record: Any, *, image: bytes | None = None, image_ext: str | None = None,
                    input_shard: str = "", where: str | None = None) -> "Sample":
        """A kept sample from a ``KEY.json`` record (and its image): ``to_record``'s inverse.

        The record is checked first (``check_record``); a malformed one raises ValueError naming
        ``where`` (default: the shard and key), the field and the fix.
        """
        where = where or f"{input_shard or 'record'} {record.get('key', '?') if isinstance(record, dict) else '?'}"
        check_record(record, where)
        return cls(
            key=str(record.get("key", "")), input_shard=input_shard, source=str(record.get("source", "")),
            image=image, image_ext=image_ext, caption=record["caption"],
            width=record["width"], height=record["height"],
            phrases=[Phrase(p["text"], (int(p["span"][0]), int(p["span"][1])))
                     for p in record.get("phrases", [])],
            boxes=[[float(v) for v in b] for b in record["boxes"]],
            tokens_positive=[[[int(a), int(b)] for a, b in spans] for spans in record["tokens_positive"]],
            scores=[float(v) for v in record.get("scores", [])], labeler=record.get("labeler"))

    def stats_row(self) -> dict[str, Any]:
        """One Parquet row (docs/architecture.md, "Output layout and statistics")."""
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
