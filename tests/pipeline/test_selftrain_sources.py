"""The student's mixture that ``pipeline selftrain`` builds: with ``known_phrases: ignore`` the pseudo
source leaves out the boxes of the detection set's own categories (read from its annotations);
with ``pseudo_per_batch: n`` its samples come in addition to the gold ones."""
from __future__ import annotations

import json

import pytest

from core.config import ConfigError, load, validate_tree
from pipeline.selftrain import load_selftrain_config
from pipeline.selftrain.loop import _sources
from synth.config import WorldConfig
from synth.world import build_world
from trainer.data.config import KnownPhrases, SourceKind


def test_known_phrases_ignore_names_the_detection_categories(tmp_path):
    world = build_world(tmp_path / "world", load(WorldConfig, "configs/world/test.yaml", []))
    categories = [c["name"] for c in json.loads(world.detection_annotations.read_text())["categories"]]
    assert "circle" in categories and "house" not in categories
    cfg = load_selftrain_config("configs/demo.yaml", [f"workdir={tmp_path}", "known_phrases=ignore"])
    sources = _sources(world, str(tmp_path / "pseudo" / "*.tar"), cfg, 0.3)
    pseudo = sources["pseudo"]
    assert pseudo.kind is SourceKind.PSEUDO and pseudo.min_score == 0.3
    assert pseudo.known_phrases is KnownPhrases.IGNORE and pseudo.known_names == categories
    for source in sources.values():
        validate_tree(source)
    official = _sources(world, str(tmp_path / "pseudo" / "*.tar"), load_selftrain_config(
        "configs/demo.yaml", [f"workdir={tmp_path}", "known_phrases=train"]), 0.3)["pseudo"]
    assert official.known_phrases is KnownPhrases.TRAIN and official.known_names == []
    assert pseudo.extra_per_batch == cfg.pseudo_per_batch
    added = _sources(world, str(tmp_path / "pseudo" / "*.tar"), load_selftrain_config(
        "configs/demo.yaml", [f"workdir={tmp_path}", "pseudo_per_batch=2"]), 0.3)["pseudo"]
    assert added.extra_per_batch == 2
    # pseudo_loss_weight: the pseudo samples a loss group of their own (trainer.step); it needs
    # them added to every batch
    weighted = _sources(world, str(tmp_path / "pseudo" / "*.tar"), load_selftrain_config(
        "configs/demo.yaml", [f"workdir={tmp_path}", "pseudo_per_batch=2", "pseudo_loss_weight=0.5"]), 0.3)["pseudo"]
    assert weighted.loss_weight == 0.5 and weighted.extra_per_batch == 2
    validate_tree(weighted)
    with pytest.raises(ConfigError, match="pseudo_loss_weight: expected >= 0 with pseudo_per_batch > 0"):
        load_selftrain_config("configs/demo.yaml", [f"workdir={tmp_path}", "pseudo_per_batch=0",
                                                    "pseudo_loss_weight=1.0"])
    # pseudo_box_loss: false -> the pseudo boxes teach the token loss only
    assert pseudo.box_loss is True
    tokens_only = _sources(world, str(tmp_path / "pseudo" / "*.tar"), load_selftrain_config(
        "configs/demo.yaml", [f"workdir={tmp_path}", "pseudo_box_loss=false"]), 0.3)["pseudo"]
    assert tokens_only.box_loss is False
    validate_tree(tokens_only)
    # the control's mixture has no pseudo source to filter
    assert list(_sources(world, None, cfg)) == ["detection", "grounding"]
