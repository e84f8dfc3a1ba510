"""Input listing of many shards: one listing per folder, not one check per brace-expanded name."""
from __future__ import annotations

import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import StorageError, expand_shards


@pytest.fixture
def shards(tmp_path):
    for i in range(300):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    (tmp_path / "00300.tar").mkdir()              # a folder with a shard's name is not a shard
    return tmp_path


def test_a_brace_pattern_lists_its_folder_once(shards, monkeypatch):
    calls = []
    monkeypatch.setattr(LocalFileSystem, "isfile", lambda self, p: calls.append(p) or True)
    found = expand_shards([f"{shards}/{{00000..00299}}.tar"])
    assert found == [f"{shards}/{i:05d}.tar" for i in range(300)]
    assert calls == []


def test_a_missing_name_is_still_named(shards):
    with pytest.raises(StorageError, match=r"00300\.tar matches no file"):
        expand_shards([f"{shards}/{{00000..00300}}.tar"])
    with pytest.raises(StorageError, match=r"other/00000\.tar matches no file"):
        expand_shards([f"{shards}/other/{{00000..00020}}.tar"])


def test_order_globs_and_few_names_unchanged(shards):
    found = expand_shards([f"{shards}/00002.tar", f"{shards}/0000[01].tar", f"{shards}/{{00002..00003}}.tar"])
    assert found == [f"{shards}/00002.tar", f"{shards}/00000.tar", f"{shards}/00001.tar",
                     f"{shards}/00003.tar"]
