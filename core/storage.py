"""Storage, the one owner: shard listing, opening inputs, and folders with atomic writes.

Every byte the project reads from or writes to a path or URL goes through this module (local
disk or any fsspec store: s3://, gs://, ...). Stages never see a path: they get bytes or file
objects from here.

``Folder``: a folder whose whole-file writes are atomic.

Readers see a file complete or not at all. Locally a file is written under a hidden temporary
name in the same folder (``.NAME.UUID.tmp``), flushed to disk and renamed (atomic on POSIX); a
killed writer leaves only such temporaries, which ``remove_stale_temporaries`` deletes. On an
object store (s3://, gs://) an object becomes visible only when its upload completes, so the
bytes go straight to the final name (streamed writers are staged in a local temporary file).

The trainer's checkpoints (``trainer.state``) and the pipeline's outputs
(``pipeline.storage.OutputDir``) both write through this class.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import posixpath
import tempfile
import uuid
from typing import IO, Any, Callable

import fsspec
from braceexpand import braceexpand
from fsspec.core import url_to_fs

__all__ = ["Folder", "ListingError", "is_local", "join", "expand_shards", "open_input", "shard_name",
           "sha256_bytes", "read_bytes", "is_dir", "join_root", "localise"]


class ListingError(FileNotFoundError):
    """An input pattern that matches nothing or cannot be listed; the message names it."""


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


class Folder:
    """``url``: a local path or an fsspec URL; ``storage_options`` go to fsspec."""

    error: type[Exception] = ValueError      # raised for a damaged file (subclasses narrow it)

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = url_to_fs(url, **self.storage_options)
        self.local = is_local(self.fs)

    def path(self, name: str) -> str:
        return join(self.root, name)

    def ensure(self) -> None:
        if self.local:
            os.makedirs(self.root, exist_ok=True)
        elif not self.fs.exists(self.root):
            self.fs.makedirs(self.root, exist_ok=True)

    def write_with(self, name: str, writer: Callable[[IO[bytes]], Any]) -> None:
        """``writer(binary file)`` produces the bytes of ``name``; readers see all of it or nothing."""
        self.ensure()
        if self.local:
            folder, base = os.path.split(self.path(name))
            if folder != self.root.rstrip("/"):
                os.makedirs(folder, exist_ok=True)      # a name in a sub-folder: images/KEY.jpg
            tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    writer(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path(name))
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
            return
        with tempfile.NamedTemporaryFile(suffix=".tmp") as fh:
            writer(fh)
            fh.flush()
            self.fs.put_file(fh.name, self.path(name))

    def write_text_with(self, name: str, writer: Callable[[IO[str]], Any]) -> None:
        """``write_with`` for UTF-8 text: ``writer(text file)``."""
        def binary(fh: IO[bytes]) -> None:
            text = io.TextIOWrapper(fh, encoding="utf-8", newline="\n", write_through=True)
            writer(text)
            text.flush()
            text.detach()
        self.write_with(name, binary)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` so that readers see either nothing or all of ``data``."""
        if self.local:
            self.write_with(name, lambda fh: fh.write(data))
        else:
            self.ensure()
            self.fs.pipe_file(self.path(name), data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            with self.fs.open(self.path(name), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def read_json(self, name: str, fix: str = "move it away and rerun") -> Any | None:
        """The parsed file, or None when it does not exist; a damaged file raises ``self.error``
        naming the file and ``fix``."""
        data = self.read_bytes(name)
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise self.error(f"{self.url}/{name} is not valid JSON ({exc}); it was not written by this "
                             f"tool or is damaged: {fix}") from None

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def names(self) -> list[str]:
        """The names directly in the folder (sorted; [] when the folder does not exist)."""
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def list(self, pattern: str) -> list[str]:
        """Names matching the glob ``pattern`` (sorted)."""
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.glob(self.path(pattern)))

    def remove(self, name: str) -> None:
        try:
            self.fs.rm(self.path(name))
        except FileNotFoundError:
            pass

    def remove_stale_temporaries(self) -> int:
        """Delete the ``.*.tmp`` files a killed writer left behind (local only); returns how many."""
        if not self.local:
            return 0
        stale = glob.glob(os.path.join(self.root, ".*.tmp"))
        for path in stale:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        return len(stale)


# ------------------------------------------------------------------------------ single files
def read_bytes(url: str, storage_options: dict[str, Any] | None = None, compression: str | None = None) -> bytes:
    """A whole file's bytes (``compression="infer"``: ``.gz``/``.bz2``/``.xz`` decompressed);
    a missing file raises FileNotFoundError."""
    with fsspec.open(str(url), "rb", compression=compression, **(storage_options or {})) as fh:
        return fh.read()


def localise(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """A local path for ``url`` (a file or a folder): local paths as they are; remote ones copied
    into a new temporary folder, returned second so the caller can delete it (else None)."""
    if "://" not in url or url.startswith("file://"):
        path = url.removeprefix("file://")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{url} does not exist")
        return path, None
    fs, remote = url_to_fs(url, **(storage_options or {}))
    tmp = tempfile.mkdtemp(prefix="glip-")
    target = os.path.join(tmp, posixpath.basename(remote.rstrip("/")))
    fs.get(remote, target, recursive=fs.isdir(remote))
    return target, tmp


def is_dir(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = url_to_fs(str(url), **(storage_options or {}))
    return bool(fs.isdir(path))


def join_root(root: str, name: str) -> str:
    """A folder (path or URL) + a relative file name (URL roots join with ``/``)."""
    if "://" in root:
        return posixpath.join(root, name.lstrip("/"))
    return os.path.join(root, name)


# ------------------------------------------------------------------------------ shard listing
def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


# From this many plain names in one folder on, one listing of the folder replaces a check per
# name (100,000 brace-expanded shards: one LIST instead of 100,000 HEAD requests or stats).
_LIST_FOLDER_AT = 8


def _files_in(fs, folder: str) -> set[str]:
    """The files directly in ``folder``, as ``fs`` spells paths (one listing)."""
    if is_local(fs):
        try:
            with os.scandir(folder) as entries:
                return {f"{folder}/{e.name}" for e in entries if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            return set()
    try:
        fs.invalidate_cache(folder)
        return {e["name"].rstrip("/") for e in fs.ls(folder, detail=True) if e.get("type") == "file"}
    except FileNotFoundError:
        return set()


def expand_shards(patterns, storage_options: dict[str, Any] | None = None, where: str = "input.shards",
                  fix: str = "check the pattern") -> list[str]:
    """Brace patterns and globs -> existing shard paths/URLs, in order of first appearance,
    without duplicates (each glob's matches sorted).

    Every pattern must match at least one file: one that does not (or cannot be listed) raises
    :class:`ListingError` naming ``where``, the pattern and ``fix`` (a typo must not silently
    shrink a run). Many plain names in one folder are checked against one listing of it.
    """
    storage_options = storage_options or {}
    filesystems: dict[str, Any] = {}
    found: list[str] = []
    for pattern in patterns:
        names = list(braceexpand(pattern))
        resolved = []
        for expanded in names:
            scheme = expanded.split("://", 1)[0] if "://" in expanded else ""
            if scheme not in filesystems:
                filesystems[scheme] = url_to_fs(expanded, **storage_options)[0]
            fs = filesystems[scheme]
            resolved.append((expanded, fs, fs._strip_protocol(expanded)))
        by_folder: dict[tuple[int, str], int] = {}
        for _, fs, path in resolved:
            if not _has_glob(path):
                key = (id(fs), path.rsplit("/", 1)[0])
                by_folder[key] = by_folder.get(key, 0) + 1
        listings: dict[tuple[int, str], set[str]] = {}
        for expanded, fs, path in resolved:
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            prefix = "" if protocol in ("file", "local") else f"{protocol}://"
            key = (id(fs), path.rsplit("/", 1)[0])
            try:
                if _has_glob(path):
                    matches = sorted(fs.glob(path))
                elif by_folder.get(key, 0) >= _LIST_FOLDER_AT:
                    if key not in listings:
                        listings[key] = _files_in(fs, key[1])
                    matches = [path] if path in listings[key] else []
                else:
                    matches = [path] if fs.isfile(path) else []
            except Exception as exc:  # noqa: BLE001 - any backend error names the location
                raise ListingError(f"{where}: cannot list {expanded}: {type(exc).__name__}: {exc}") from exc
            if not matches:
                raise ListingError(f"{where}: {expanded} matches no file ({fix})")
            found.extend(m if not prefix or m.startswith(prefix) else prefix + m for m in matches)
    return list(dict.fromkeys(found))


def shard_name(url: str) -> str:
    """``s3://b/cc3m/00012.tar`` -> ``00012`` (the output files of a shard are named after it)."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    return base[:-4] if base.endswith(".tar") else base.split(".", 1)[0]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_input(url: str, storage_options: dict[str, Any] | None = None):
    """A binary file object for a path or URL (the caller closes it)."""
    return fsspec.open(url, "rb", **(storage_options or {})).open()
