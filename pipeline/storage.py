"""Storage through fsspec: shard listing, reading, and atomic writes (local and object stores).

Local files are written under a temporary name in the same folder and renamed (atomic on POSIX).
Object stores (s3://, gs://) never expose a partial object: an upload becomes visible only when
it completes, so finished bytes are written straight to the final name.
"""
from __future__ import annotations

import hashlib
from typing import Any

import fsspec
from braceexpand import braceexpand
from fsspec.core import url_to_fs

from stages.folder import Folder


class StorageError(RuntimeError):
    """A location that cannot be read or written; the message names it."""


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def expand_shards(patterns: list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Brace patterns and globs -> a sorted, de-duplicated list of shard URLs/paths.

    Every pattern must match at least one existing shard; a missing one raises StorageError
    naming it (a typo must not silently shrink a run).
    """
    storage_options = storage_options or {}
    found: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand(pattern):
            fs, path = url_to_fs(expanded, **storage_options)
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            prefix = "" if protocol in ("file", "local") else f"{protocol}://"
            try:
                if _has_glob(path):
                    matches = sorted(fs.glob(path))
                else:
                    matches = [path] if fs.isfile(path) else []
            except Exception as exc:  # noqa: BLE001 - any backend error names the location
                raise StorageError(f"cannot list input {expanded}: {type(exc).__name__}: {exc}") from exc
            if not matches:
                raise StorageError(f"input {expanded} matches no file (check input.shards)")
            found.extend(prefix + m if prefix and not m.startswith(prefix) else m for m in matches)
    # keep order of first appearance, drop duplicates
    seen: set[str] = set()
    unique = [u for u in found if not (u in seen or seen.add(u))]
    return unique


def shard_name(url: str) -> str:
    """``s3://b/cc3m/00012.tar`` -> ``00012`` (the output files of a shard are named after it)."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    return base[:-4] if base.endswith(".tar") else base.split(".", 1)[0]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OutputDir(Folder):
    """A folder (local path or fsspec URL) that receives committed files atomically
    (``stages.folder.Folder``); errors are ``StorageError``s that name the output."""

    error = StorageError

    def ensure(self) -> None:
        try:
            super().ensure()
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot create output {self.url}: {type(exc).__name__}: {exc}") from exc


def open_input(url: str, storage_options: dict[str, Any] | None = None):
    """A binary file object for an input shard (caller closes it)."""
    return fsspec.open(url, "rb", **(storage_options or {})).open()
