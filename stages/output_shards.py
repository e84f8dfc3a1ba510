"""Output shards: read them back, and write files whole into an output folder.

Used by ``stages.gallery`` and ``stages.export`` (and re-exported by ``stages.gallery``):

- ``read_output_samples(source, name=...) -> Iterator[(record, image_bytes, image_ext)]``: one
  output shard (``KEY.<ext>`` + ``KEY.json`` pairs, as ``stages.write.encode_shard`` writes them)
  read as a stream from bytes or a binary file object; every record passes ``check_record``.
- ``iter_output_samples(shards, storage_options=None) -> Iterator[OutputSample]``: the samples of
  several shards (local paths or fsspec URLs), each tagged with its shard's name.
- ``check_record(record, where)``: the fields the gallery and the exporters rely on, with an
  error naming the shard, the key, the field and the fix.
- ``filter_record(record, min_score) -> (record, n_removed)``: drop boxes scoring below
  ``min_score`` (boxes without a score, i.e. human labels, are kept).
- ``OutputFolder(url, storage_options=None)``: a folder (local path or fsspec URL) that files are
  written into whole (a temporary name then a rename locally, one upload on an object store).
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import lzma
import math
import os
import tarfile
import uuid
import zlib
from typing import IO, Any, Iterable, Iterator, NamedTuple

import fsspec
from fsspec.core import url_to_fs

from stages.schema import IMAGE_EXTENSIONS
from stages.shards import EndAwareTarInfo, split_member_name

__all__ = ["OutputSample", "read_output_samples", "iter_output_samples", "check_record",
           "filter_record", "shard_label", "OutputFolder"]

_FIX_SHARD = ("the shard was not written by stages.write.encode_shard or is damaged; rerun the "
              "pipeline for its input shard")
# A corrupt or truncated tar (or compression); an OSError of the file itself propagates.
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


class OutputSample(NamedTuple):
    record: dict
    image: bytes
    ext: str
    shard: str = ""            # the shard's name (``00012``), "" when unknown


# ------------------------------------------------------------------------------------ reading
def _fail(where: str, field: str, problem: str, fix: str = _FIX_SHARD) -> ValueError:
    return ValueError(f"{where}: {field}: {problem}. Fix: {fix}")


def _is_number(value: Any) -> bool:
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
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise _fail(where, f"boxes[{i}]", f"expected 4 finite numbers, got {box!r:.60}")
        if box[2] < box[0] or box[3] < box[1]:
            raise _fail(where, f"boxes[{i}]", f"x2 < x1 or y2 < y1 in {box!r}",
                        "boxes are absolute [x1, y1, x2, y2]; " + _FIX_SHARD)
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
                or not all(_is_number(s) for s in scores)):
            raise _fail(where, "scores", f"expected one finite number per box ({len(boxes)}), "
                        f"got {scores!r:.60}")


def read_output_samples(source: bytes | bytearray | memoryview | IO[bytes],
                        name: str = "output shard") -> Iterator[tuple[dict, bytes, str]]:
    """Yield ``(record, image_bytes, image_ext)`` per key of one output shard, in tar order.

    ``source`` is the tar's bytes or a readable binary file object (read as a stream, nothing is
    extracted to disk). ``name`` appears in every error. Raises ValueError for an unreadable or
    truncated tar (also one cut at a member boundary: the end-of-archive marker is required), a
    record that is not JSON or fails ``check_record``, a key without its image or record, a
    duplicate key, or a member that is not a regular file. The samples before the problem have
    been yielded by then.
    """
    fileobj = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) \
        else source
    pending: dict[str, dict[str, Any]] = {}
    done: set[str] = set()
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=EndAwareTarInfo) as tar:
            for member in tar:
                if member.isdir():
                    continue
                key, ext = split_member_name(member.name)
                if not member.isfile():
                    raise _fail(name, member.name, "not a regular file (link or device)")
                if ext != "json" and ext not in IMAGE_EXTENSIONS:
                    continue
                if key in done:
                    raise _fail(name, member.name, f"key {key!r} appears twice")
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise _fail(name, member.name, f"{len(data)} of {member.size} bytes (the tar "
                                "is truncated)")
                part = pending.setdefault(key, {})
                slot = "record" if ext == "json" else "image"
                if slot in part:
                    raise _fail(name, member.name, f"key {key!r} has two {slot} members")
                if ext == "json":
                    try:
                        record = json.loads(data)
                    except (ValueError, UnicodeDecodeError) as exc:
                        raise _fail(name, member.name, f"not valid UTF-8 JSON ({exc})") from None
                    check_record(record, f"{name}: {member.name}")
                    if record.get("key", key) != key:
                        raise _fail(name, f"{member.name}: key", f"record key {record['key']!r}"
                                    f" differs from the member name {key!r}")
                    part["record"] = record
                else:
                    part["image"], part["ext"] = data, ext
                if "record" in part and "image" in part:
                    del pending[key]
                    done.add(key)
                    yield part["record"], part["image"], part["ext"]
            end = getattr(tar, "_glip_end_reason", None)
            if not isinstance(end, tarfile.EOFHeaderError):
                raise _fail(name, "(end)", f"the tar stops without its end-of-archive marker "
                            f"({type(end).__name__ if end else 'no header'}): it is truncated")
    except _TAR_ERRORS as exc:
        raise ValueError(f"{name}: not a readable tar ({type(exc).__name__}: {exc}). Fix: "
                         f"{_FIX_SHARD}") from None
    if pending:
        key, part = next(iter(pending.items()))
        missing = "image (.jpg/.jpeg/.png/.webp)" if "image" not in part else ".json record"
        raise _fail(name, key, f"has no {missing} ({len(pending)} key(s) incomplete; the tar may be "
                    "truncated)")


def shard_label(url: str) -> str:
    """``s3://b/out/00012.tar`` -> ``00012``."""
    base = str(url).rstrip("/").rsplit("/", 1)[-1]
    return base[:-4] if base.endswith(".tar") else base


def iter_output_samples(shards: str | Iterable[str],
                        storage_options: dict | None = None) -> Iterator[OutputSample]:
    """The samples of every shard (local paths or fsspec URLs), in the order given."""
    for url in [shards] if isinstance(shards, (str, os.PathLike)) else shards:
        url = os.fspath(url)
        try:
            fh = fsspec.open(url, "rb", **(storage_options or {})).open()
        except FileNotFoundError:
            raise FileNotFoundError(f"output shard {url} does not exist; list the OUTPUT/*.tar "
                                    "files of a finished run") from None
        with fh:
            for record, image, ext in read_output_samples(fh, name=url):
                yield OutputSample(record, image, ext, shard_label(url))


def filter_record(record: dict, min_score: float | None) -> tuple[dict, int]:
    """A copy of ``record`` without the boxes scoring below ``min_score``; and how many went."""
    scores = record.get("scores")
    if min_score is None or scores is None:
        return record, 0
    keep = [i for i, s in enumerate(scores) if s >= min_score]
    if len(keep) == len(scores):
        return record, 0
    out = dict(record)
    for field in ("boxes", "tokens_positive", "scores"):
        out[field] = [record[field][i] for i in keep]
    return out, len(scores) - len(keep)


# ------------------------------------------------------------------------------------ output
class OutputFolder:
    """A folder (local path or fsspec URL) that files are written into whole: a local file
    under a temporary name then renamed, an object store object uploaded once finished."""

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None) -> None:
        self.url = os.fspath(url)
        self.fs, self.root = url_to_fs(self.url, **(storage_options or {}))
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.local = protocol in ("file", "local")

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def makedirs(self, name: str = "") -> None:
        target = self.path(name) if name else self.root
        try:
            self.fs.makedirs(target, exist_ok=True)
        except Exception as exc:  # noqa: BLE001 - any backend error names the location
            raise OSError(f"cannot create the folder {target} ({type(exc).__name__}: {exc}); "
                          "check the output path and its permissions") from exc

    def _tmp(self, final: str) -> str:
        folder, base = os.path.split(final)
        return os.path.join(folder, f".{base}.{uuid.uuid4().hex}.tmp")

    def write_bytes(self, name: str, data: bytes) -> str:
        final = self.path(name)
        if not self.local:
            self.fs.pipe_file(final, data)
            return final
        tmp = self._tmp(final)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return final

    @contextlib.contextmanager
    def open_text(self, name: str) -> Iterator[IO[str]]:
        """A text file that appears under ``name`` only if the block finishes without error."""
        final = self.path(name)
        if not self.local:
            buffer = io.StringIO()
            yield buffer
            self.fs.pipe_file(final, buffer.getvalue().encode("utf-8"))
            return
        tmp = self._tmp(final)
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                yield fh
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
