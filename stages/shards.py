"""Read img2dataset webdataset shards (``KEY.jpg|jpeg|png|webp``, ``KEY.txt``, ``KEY.json``).

``read_shard(fileobj, shard_name, source="") -> ShardContents``

The shard is read as a stream (``tarfile`` mode ``"r|*"``, so plain, gzip, bz2 and xz tars all
work, and any readable binary file object will do: a local file, an fsspec file, a socket
wrapper). Nothing is ever extracted to disk: member payloads are read into memory only.

Return value (a deliberate change from a bare ``list[Sample]``): a ``ShardContents`` with

- ``samples``: one ``Sample`` per key, in the order each key first appears in the tar;
- ``error``: ``None`` when the tar was read to its end, else a one-line message naming the
  shard, how many members were read and what went wrong (truncated or corrupt tar, bad
  compression). The samples read before the error are still returned, so the pipeline keeps
  them and records the error in the shard's stats (``write.shard_stats(read_error=...)``).

``ShardContents`` also iterates, indexes and ``len()``-s like its ``samples`` list.
``read_shard`` raises nothing for bad tar content; an ``OSError`` from the file object itself
(file not found, permission, network) propagates: an unreadable location stops the run.

Grouping (the webdataset convention): a member ``dir/0001.seg.png`` has key ``dir/0001`` (its
path up to the first dot of the basename) and extension ``seg.png``; extensions are matched
case-insensitively; a leading ``./`` is ignored. Members are grouped by key in file order; a key seen again later joins its
first group. Of several members with the same extension, the first one wins.

- image: the first member whose extension is one of ``jpg jpeg png webp`` (``image_ext`` is
  that extension, lower-cased); a key without one is dropped ``NO_IMAGE``.
- ``KEY.txt`` -> ``raw_caption`` (bytes, undecoded: ``ingest`` decodes and validates it);
  missing -> ``None`` (``ingest`` drops it ``NO_CAPTION``).
- ``KEY.json`` -> ``meta`` (the parsed object); a json that does not parse or is not an object
  gives ``meta = {}`` and is not a drop.
- Other extensions are ignored. Directory members are skipped (they carry no sample).

Security: a member whose name is absolute, contains a ``..`` path component, contains a NUL or
a backslash, or whose basename starts with a dot (no key), and every member that is not a
regular file (symlink, hard link, device, fifo), is never read; its key becomes a dropped
sample with ``UNSAFE_NAME`` and its other members are ignored too. A member larger than
``max_member_bytes`` is not read either; its key is dropped ``DECODE_ERROR``.

Output keys (``Sample.key``), the rule: every character outside ``[A-Za-z0-9_-]`` (dots,
slashes, spaces, non-ASCII) becomes ``_``; a key longer than 80 characters becomes its first
63 characters, ``-`` and the first 16 hex digits of the SHA-1 of the input key; if the result
is already taken by an earlier key of this shard, ``-1``, ``-2``, ... is appended (the first
free one). So the output key is deterministic, unique within the shard, dot-free and
slash-free, and equals the input key for every img2dataset key (``000010042``).
``output_key(key)`` applies the first two steps. When the output key differs from the input
key, ``meta["input_key"]`` keeps the input key.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Iterator

from stages.schema import IMAGE_EXTENSIONS, DropReason, Sample

__all__ = ["ShardContents", "read_shard", "split_member_name", "output_key", "is_unsafe_name", "EndAwareTarInfo"]

MAX_KEY_CHARS = 80
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
# Errors that mean "the tar (or its compression) is corrupt or truncated". A plain OSError
# (missing file, network) is not in this list on purpose: it propagates.
_CORRUPT_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


@dataclass
class ShardContents:
    """What ``read_shard`` found: every sample read, and the read error if the tar is bad."""

    samples: list[Sample] = field(default_factory=list)
    error: str | None = None

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/0001.seg.PNG"`` -> ``("dir/0001", "seg.png")`` (webdataset's key convention)."""
    dirname, basename = posixpath.split(name)
    stem, dot, ext = basename.partition(".")
    key = posixpath.join(dirname, stem) if dirname else stem
    return key, ext.lower() if dot else ""


def is_unsafe_name(name: str) -> bool:
    """True for a member name that must never be trusted (absolute, ``..``, NUL, no key)."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return True
    if re.match(r"^[A-Za-z]:", name):          # a Windows drive path
        return True
    parts = name.split("/")
    if any(part == ".." for part in parts):
        return True
    basename = parts[-1]
    return basename == "" or basename.startswith(".")


def output_key(key: str) -> str:
    """The dot-free, slash-free form of an input key (without the per-shard uniqueness suffix)."""
    clean = _UNSAFE_KEY_CHARS.sub("_", key) or "_"
    if len(clean) > MAX_KEY_CHARS:
        digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        clean = f"{clean[:63]}-{digest}"
    return clean


class EndAwareTarInfo(tarfile.TarInfo):
    """Records why the member list ended, so a tar cut at a member boundary is noticed.

    ``tarfile`` ends the iteration silently both at the end-of-archive marker (a zero block)
    and when the data simply stops (a truncated tar); only the first one is a clean end.
    """

    @classmethod
    def fromtarfile(cls, tar):  # noqa: D102 - tarfile's own hook
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar._glip_end_reason = exc
            raise


@dataclass
class _Group:
    input_key: str
    image: bytes | None = None
    image_ext: str | None = None
    caption: bytes | None = None
    meta_bytes: bytes | None = None
    unsafe: str = ""            # why the key is unsafe (first reason), "" when safe
    too_big: str = ""           # a member over max_member_bytes
    truncated: str = ""         # the member being read when the tar broke
    seen_exts: set[str] = field(default_factory=set)


def _parse_meta(data: bytes | None) -> dict:
    if not data:
        return {}
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def read_shard(fileobj: IO[bytes], shard_name: str, source: str = "", *,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> ShardContents:
    """Read one img2dataset shard from a binary file object; see the module docstring."""
    groups: dict[str, _Group] = {}
    n_members = 0
    current_name = ""
    current: _Group | None = None       # the group of the last member read
    error: str | None = None

    def group_for(key: str) -> _Group:
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(input_key=key)
        return group

    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=EndAwareTarInfo) as tar:
            for member in tar:
                n_members += 1
                name = member.name
                current_name = name
                while name.startswith("./"):    # "tar -cf x.tar ./": ./0001.jpg is 0001.jpg
                    name = name[2:]
                if member.isdir():          # carries no sample; nothing is ever extracted
                    continue
                key, ext = split_member_name(name)
                if is_unsafe_name(name):
                    group = current = group_for(key or name)
                    group.unsafe = group.unsafe or f"unsafe member name {name!r}"
                    continue
                group = current = group_for(key)
                if not member.isfile():
                    kind = ("symlink" if member.issym() else "hard link" if member.islnk()
                            else "device" if member.isdev() else "fifo" if member.isfifo()
                            else "special file")
                    group.unsafe = group.unsafe or f"member {name!r} is a {kind}, not a regular file"
                    continue
                if group.unsafe or ext in group.seen_exts:
                    continue
                wanted = ext in IMAGE_EXTENSIONS and group.image is None or ext in ("txt", "json")
                if not wanted:
                    continue
                group.seen_exts.add(ext)
                if member.size > max_member_bytes:
                    group.too_big = group.too_big or (
                        f"member {name!r} has {member.size} bytes (> max_member_bytes "
                        f"{max_member_bytes})")
                    continue
                group.truncated = name          # cleared once the payload is fully read
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                group.truncated = ""
                if ext in IMAGE_EXTENSIONS:
                    group.image, group.image_ext = data, ext
                elif ext == "txt":
                    group.caption = data
                else:
                    group.meta_bytes = data
            end = getattr(tar, "_glip_end_reason", None)
            if not isinstance(end, tarfile.EOFHeaderError):
                why = ("the data ends without the end-of-archive marker"
                       if end is None or isinstance(end, tarfile.EmptyHeaderError)
                       else f"{type(end).__name__}: {end}")
                error = (f"{shard_name}: truncated or corrupt tar after {n_members} members "
                         f"(last {current_name!r}): {why}")
    except _CORRUPT_TAR_ERRORS as exc:
        where = f" in member {current_name!r}" if current_name else ""
        error = (f"{shard_name}: truncated or corrupt tar after {n_members} members{where}: "
                 f"{type(exc).__name__}: {exc}")
    if error is not None and current is not None:
        # The members of a key are contiguous (img2dataset, webdataset), so the key being read
        # when the tar broke may be incomplete; the keys before it are not.
        current.truncated = current.truncated or current_name

    samples: list[Sample] = []
    used: set[str] = set()
    for group in groups.values():
        base = output_key(group.input_key)
        key, n = base, 0
        while key in used:
            n += 1
            key = f"{base}-{n}"
        used.add(key)
        sample = Sample(key=key, input_shard=shard_name, source=source)
        if key != group.input_key:
            sample.meta = {"input_key": group.input_key}
        if group.unsafe:
            sample.drop(DropReason.UNSAFE_NAME, group.unsafe)
        elif group.truncated:
            sample.drop(DropReason.DECODE_ERROR, f"the shard breaks off at {group.truncated!r}: "
                        "this key's members may be incomplete")
        elif group.too_big:
            sample.drop(DropReason.DECODE_ERROR, group.too_big)
        elif group.image is None:
            sample.drop(DropReason.NO_IMAGE, f"no member {group.input_key}.<"
                        + "|".join(IMAGE_EXTENSIONS) + ">")
        else:
            sample.image, sample.image_ext = group.image, group.image_ext
            sample.raw_caption = group.caption
            meta = _parse_meta(group.meta_bytes)
            sample.meta = {**meta, **sample.meta}
        samples.append(sample)
    return ShardContents(samples=samples, error=error)
