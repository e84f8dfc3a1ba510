"""The reader of our own output shards: bytes or a file object in, ``Sample`` s out.

- ``read_output_samples(source, name=...) -> Iterator[Sample]``: one output shard (``KEY.<ext>``
  + ``KEY.json`` pairs, as ``stages.write.encode_shard`` writes them) read as a stream from bytes
  or a binary file object; every record goes through ``Sample.from_record`` (so through
  ``stages.schema.check_record``).
- ``filter_scores(sample, min_score) -> (sample, n_removed)``: drop boxes scoring below
  ``min_score`` (boxes without a score, i.e. human labels, are kept).
- ``shard_label(url)``: the shard's name (``00012``).

Opening shards by path or URL is storage's job (``pipeline.storage.iter_output_samples``, or
``core.storage.open_input`` and this reader).
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import lzma
import tarfile
import zlib
from typing import IO, Any, Iterator

from stages.schema import IMAGE_EXTENSIONS, Sample
from stages.shards import EndAwareTarInfo, split_member_name

__all__ = ["read_output_samples", "filter_scores", "shard_label"]

_FIX_SHARD = ("the shard was not written by stages.write.encode_shard or is damaged; rerun the "
              "pipeline for its input shard")
# A corrupt or truncated tar (or compression); an OSError of the file itself propagates.
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


# ------------------------------------------------------------------------------------ reading
def _fail(where: str, field: str, problem: str, fix: str = _FIX_SHARD) -> ValueError:
    return ValueError(f"{where}: {field}: {problem}. Fix: {fix}")


def read_output_samples(source: bytes | bytearray | memoryview | IO[bytes],
                        name: str = "output shard") -> Iterator[Sample]:
    """Yield one ``Sample`` (``Sample.from_record`` with its image bytes and extension, and
    ``input_shard`` = the shard's label) per key of one output shard, in tar order.

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
                    sample = Sample.from_record(record, input_shard=shard_label(name),
                                                where=f"{name}: {member.name}")
                    if record.get("key", key) != key:
                        raise _fail(name, f"{member.name}: key", f"record key {record['key']!r}"
                                    f" differs from the member name {key!r}")
                    part["record"] = sample
                else:
                    part["image"], part["ext"] = data, ext
                if "record" in part and "image" in part:
                    del pending[key]
                    done.add(key)
                    sample = part["record"]
                    sample.image, sample.image_ext = part["image"], part["ext"]
                    yield sample
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


def filter_scores(sample: Sample, min_score: float | None) -> tuple[Sample, int]:
    """``sample`` without the boxes scoring below ``min_score`` (a copy when any goes; boxes
    without a score, i.e. human labels, are kept); and how many went."""
    if min_score is None or not sample.scores:
        return sample, 0
    keep = [i for i, s in enumerate(sample.scores) if s >= min_score]
    if len(keep) == len(sample.scores):
        return sample, 0
    out = dataclasses.replace(sample, boxes=[sample.boxes[i] for i in keep],
                              tokens_positive=[sample.tokens_positive[i] for i in keep],
                              scores=[sample.scores[i] for i in keep])
    return out, len(sample.scores) - len(keep)
