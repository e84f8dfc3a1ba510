"""The declared DAG: ``stages:`` lists the stages in order, each with its typed config and resources."""
from __future__ import annotations

import pytest

from core.config import ConfigError
from pipeline.config import load_run_config, semantic_hash
from pipeline.runner import Hop, plan
from stages.ingest import IngestConfig
from stages.noun_phrases import NounPhraseConfig

BASE = ["input.shards=[a.tar]", "output.path=out"]


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_default_dag_and_the_teacher_added_by_one_override():
    cfg = load_run_config(None, BASE)
    assert list(cfg.stages) == ["ingest", "noun_phrases"]
    assert isinstance(cfg.stages["ingest"], IngestConfig)
    assert isinstance(cfg.stages["noun_phrases"], NounPhraseConfig)
    cfg = load_run_config(None, [*BASE, "stages.pseudo_label.checkpoint=t.pth"])
    assert list(cfg.stages) == ["ingest", "noun_phrases", "pseudo_label"]
    assert cfg.stages["pseudo_label"].checkpoint == "t.pth"
    assert cfg.stages["pseudo_label"].resources.num_gpus == 1.0
    cfg = load_run_config(None, [*BASE, "stages.pseudo_label.checkpoint=t.pth", "stages.pseudo_label=null"])
    assert list(cfg.stages) == ["ingest", "noun_phrases"]


def test_the_file_gives_the_order_and_the_resources(tmp_path):
    path = _write(tmp_path, "input: {shards: [a.tar]}\noutput: {path: out}\nstages:\n"
                            "  noun_phrases: {resources: {actors: 3, num_cpus: 0.25}}\n"
                            "  ingest: {min_size: 8, resources: {actors: 1}}\n")
    cfg = load_run_config(path)
    assert list(cfg.stages) == ["noun_phrases", "ingest"]
    assert cfg.stages["noun_phrases"].resources.actors == 3
    assert cfg.stages["noun_phrases"].resources.num_cpus == 0.25
    assert cfg.stages["ingest"].min_size == 8


@pytest.mark.parametrize("override, expected", [
    ("stages.dedup.x=1", "stages.dedup in command line: unknown stage 'dedup'; the stages are: ingest"),
    ("noun_phrases.batch_size=3", "noun_phrases in command line: stage settings moved under stages:"),
    ("ray.noun_phrase_actors=2", "write stages.noun_phrases.resources.actors instead"),
    ("ray.teacher_num_gpus=1", "write stages.pseudo_label.resources.num_gpus instead"),
    ("stages.noun_phrases.resources.actors=-1", "resources.actors must be an integer >= 0"),
    ("stages.ingest.resources.num_gpus=1", "resources.num_gpus needs resources.actors >= 1"),
    ("stages=[ingest]", "stages in command line: expected a mapping of stage name"),
])
def test_mistakes_are_named(override, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(")
                       .replace("[", r"\[").replace("'", ".")):
        load_run_config(None, [*BASE, override])


def test_hash_covers_stage_settings_and_order_but_not_resources(tmp_path):
    base = semantic_hash(load_run_config(None, BASE))
    assert semantic_hash(load_run_config(None, [*BASE, "stages.noun_phrases.resources.actors=7",
                                                "stages.ingest.resources.num_cpus=1"])) == base
    assert semantic_hash(load_run_config(None, [*BASE, "stages.noun_phrases.max_phrases=3"])) != base
    swapped = _write(tmp_path, "stages: {noun_phrases: {}, ingest: {}}\n")
    assert semantic_hash(load_run_config(swapped, BASE)) != base


def test_plan_hosts_each_stage_by_its_resources():
    cfg = load_run_config(None, BASE)
    assert plan(cfg) == (("ingest",), [Hop(("noun_phrases",), 1, 0.5, 0.0)])
    cfg = load_run_config(None, [*BASE, "stages.ingest.resources.actors=2",
                                 "stages.noun_phrases.resources.actors=0",
                                 "stages.pseudo_label.checkpoint=t.pth",
                                 "stages.pseudo_label.resources.actors=0",
                                 "stages.pseudo_label.resources.num_gpus=0"])
    leading, hops = plan(cfg)
    assert leading == () and hops == [Hop(("ingest",), 2, 0.5, 0.0),
                                      Hop(("noun_phrases", "pseudo_label"), 0, 0.5, 0.0)]


def test_a_config_class_can_name_runtime_fields_the_hash_leaves_out(monkeypatch):
    base = semantic_hash(load_run_config(None, BASE))
    assert semantic_hash(load_run_config(None, [*BASE, "stages.noun_phrases.batch_size=7"])) != base
    monkeypatch.setattr(NounPhraseConfig, "runtime_fields", ("batch_size",), raising=False)
    base = semantic_hash(load_run_config(None, BASE))
    assert semantic_hash(load_run_config(None, [*BASE, "stages.noun_phrases.batch_size=7"])) == base
