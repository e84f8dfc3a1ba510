"""Run-config errors stop the command before any work, naming the key, file and fix."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import RunConfig, load_run_config, semantic_hash
from core.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_overrides_reach_nested_stage_configs(tmp_path):
    path = _write(tmp_path, "input: {shards: [a.tar]}\noutput: {path: out}\n")
    cfg = load_run_config(path, ["stages.noun_phrases.batch_size=64", "stages.noun_phrases.resources.actors=3"])
    assert isinstance(cfg, RunConfig)
    nouns = cfg.stages["noun_phrases"]
    assert nouns.batch_size == 64 and nouns.resources.actors == 3


def test_semantic_hash_ignores_how_it_runs_but_not_what_it_computes(tmp_path):
    path = _write(tmp_path, "input: {shards: [a.tar]}\noutput: {path: out}\n")
    base = semantic_hash(load_run_config(path))
    assert semantic_hash(load_run_config(path, ["stages.noun_phrases.resources.actors=5", "progress=false"])) == base
    assert semantic_hash(load_run_config(path, ["stages.ingest.min_size=100"])) != base


def test_semantic_hash_names_the_teacher_by_its_bytes_not_its_path(tmp_path):
    """A checkpoint folder moved elsewhere hashes the same; other bytes hash differently; a path
    that does not exist (or a URL) counts as written; by_content=False is the path-based hash."""
    import shutil
    path = _write(tmp_path, "input: {shards: [a.tar]}\noutput: {path: out}\n")
    ckpt = tmp_path / "a" / "model"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "config.json").write_text("{}")

    def run_hash(checkpoint, by_content=True):
        return semantic_hash(load_run_config(path, [f"stages.pseudo_label.checkpoint={checkpoint}"]), by_content)

    here = run_hash(ckpt)
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    moved = tmp_path / "b" / "model"
    assert run_hash(moved) == here
    assert run_hash(moved, by_content=False) != run_hash(ckpt, by_content=False)
    (moved / "model.safetensors").write_bytes(b"other weights")
    assert run_hash(moved) != here
    assert run_hash(tmp_path / "missing") == run_hash(tmp_path / "missing", by_content=False)
    assert run_hash("s3://bucket/model") == run_hash("s3://bucket/model", by_content=False)


@pytest.mark.parametrize("override, expected", [
    ("stages.ingest.min_sise=3", "unknown key stages.ingest.min_sise"),
    ("stages.ingest.min_size=big", "stages.ingest.min_size"),
    ("batch_size=0", "batch_size must be >= 1"),
])
def test_bad_values_are_named(tmp_path, override, expected):
    path = _write(tmp_path, "input: {shards: [a.tar]}\noutput: {path: out}\n")
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_run_config(path, [override])


@pytest.mark.parametrize("args, expected", [
    (["stages.ingest.max_sise=3"], "unknown key stages.ingest.max_sise"),
    (["stages.noun_phrases.resources.actors=two"], "stages.noun_phrases.resources.actors"),
    (["input.shards=[missing/{00000..00002}.tar]"], "missing/00000.tar matches no file"),
])
def test_cli_fails_with_one_line_and_writes_nothing(tmp_path, args, expected):
    cfg = _write(tmp_path, "input: {shards: [in/*.tar]}\noutput: {path: out}\n")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(b"")
    result = _cli("run", str(cfg), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_missing_config_file(tmp_path):
    result = _cli("run", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert result.returncode == 2 and "nope.yaml does not exist" in result.stderr
