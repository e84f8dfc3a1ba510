"""The pipeline's output folder and its storage errors.

Listing, opening and atomic writes are ``core.storage``'s; this module adds what the CLI shows:
a :class:`StorageError` that names the location.
"""
from __future__ import annotations

from typing import Any

from core.storage import Folder, ListingError, open_input, sha256_bytes, shard_name
from core.storage import expand_shards as _expand


class StorageError(RuntimeError):
    """A location that cannot be read or written; the message names it."""


def expand_shards(patterns: list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """``core.storage.expand_shards`` for ``input.shards``; a bad pattern is a StorageError."""
    try:
        return _expand(patterns, storage_options, where="input.shards",
                       fix="check input.shards")
    except ListingError as exc:
        raise StorageError(str(exc)) from None


__all__ = ["StorageError", "OutputDir", "expand_shards", "iter_output_samples", "open_input", "sha256_bytes",
           "shard_name"]


class OutputDir(Folder):
    """A folder (local path or fsspec URL) that receives committed files atomically
    (``core.storage.Folder``); errors are ``StorageError``s that name the output."""

    error = StorageError

    def ensure(self) -> None:
        try:
            super().ensure()
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot create output {self.url}: {type(exc).__name__}: {exc}") from exc


def iter_output_samples(shards, storage_options: dict[str, Any] | None = None):
    """The ``Sample`` s of output shards (paths or URLs), shard after shard, in the order given
    (``stages.readers.output.read_output_samples`` over ``core.storage.open_input``)."""
    import os

    from stages.readers.output import read_output_samples

    for url in [shards] if isinstance(shards, (str, os.PathLike)) else shards:
        url = os.fspath(url)
        try:
            fh = open_input(url, storage_options)
        except FileNotFoundError:
            raise StorageError(f"output shard {url} does not exist; list the OUTPUT/*.tar files of a "
                               "finished run") from None
        with fh:
            yield from read_output_samples(fh, name=url)
