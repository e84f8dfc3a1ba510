"""Fixtures of the stage tests: one spaCy pipeline and one set of synthetic shards per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages.ingest import Ingest
from stages.shards import ShardContents, read_shard
from synth.web import write_web_shards


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Two img2dataset shards (the first with every awkward case) and their expectations."""
    root = tmp_path_factory.mktemp("web_shards")
    expected = write_web_shards(root, n_shards=2, samples_per_shard=12, seed=0, bad_samples=True)
    return root, expected


@pytest.fixture(scope="session")
def run_shard(noun_phrase_stage):
    """``run_shard(path) -> ShardContents``: read, ingest and noun phrases, freshly each call."""

    def run(path: Path, source: str = "test") -> ShardContents:
        with open(path, "rb") as fh:
            contents = read_shard(fh, path.name.removesuffix(".tar"), source=source)
        Ingest()(contents.samples)
        noun_phrase_stage(contents.samples)
        return contents

    return run
