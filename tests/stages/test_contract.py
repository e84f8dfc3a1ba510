"""Every registered stage keeps the stage contract (stages/base.py, docs/stage_contract.md).

Parametrised over ``stages.registry.registered_stages()``: a new stage module is checked as soon as
it exists. Each stage gets a real batch prepared by the stages before it (in DAG order), so the
teacher sees phrases and the noun-phrase stage sees decoded captions.
"""
from __future__ import annotations

import copy
import json
import pickle

import pytest

from core.config import from_dict, to_dict
from stages.base import Resources
from stages.registry import registered_stages, stage_spec
from stages.schema import DropReason, Sample, Status
from stages.shards import read_shard
from stages.write import encode_shard, merge_stats, shard_stats, stats_table
from synth.web import write_web_shards


STAGES = registered_stages()


def _config(name: str, tiny_teacher, teacher_overrides):
    spec = stage_spec(name)
    if name == "pseudo_label":
        return from_dict(spec.config_class, {"checkpoint": str(tiny_teacher), "min_score": 0.06,
                                             "model_overrides": teacher_overrides, "batch_size": 4})
    return spec.config_class()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    write_web_shards(root, n_shards=1, samples_per_shard=10, seed=5, bad_samples=True)
    return root / "00000.tar"


@pytest.fixture(scope="module")
def stages(tiny_teacher, teacher_overrides):
    """name -> a set-up stage (built once per module: spaCy and the teacher load in seconds)."""
    built = {}
    for name in STAGES:
        stage = stage_spec(name).stage_class(_config(name, tiny_teacher, teacher_overrides))
        stage.setup()
        built[name] = stage
    return built


def _batch_for(name: str, shard, stages) -> list[Sample]:
    """A fresh batch of the shard with every stage registered before ``name`` applied."""
    with open(shard, "rb") as fh:
        samples = read_shard(fh, "00000", source="test").samples
    for earlier in STAGES:
        if earlier == name:
            break
        stages[earlier](samples)
    return samples


def _snapshot(samples: list[Sample]) -> list[tuple]:
    return [(s.key, s.status, s.drop_reason, s.drop_detail) for s in samples]


@pytest.mark.parametrize("name", list(STAGES))
def test_registry_names_match_the_stage(name):
    spec = stage_spec(name)
    assert spec.stage_class.name == name
    assert isinstance(spec.config_class().resources, Resources)


@pytest.mark.parametrize("name", list(STAGES))
def test_empty_batch(name, stages):
    assert stages[name]([]) == []


@pytest.mark.parametrize("name", list(STAGES))
def test_all_dropped_batch_is_returned_untouched(name, shard, stages):
    batch = _batch_for(name, shard, stages)
    for sample in batch:
        if sample.kept:
            sample.drop(DropReason.DECODE_ERROR, "dropped upstream")
    before = _snapshot(batch)
    ids = [id(s) for s in batch]
    out = stages[name](batch)
    assert [id(s) for s in out] == ids and _snapshot(out) == before


@pytest.mark.parametrize("name", list(STAGES))
def test_a_real_batch_keeps_every_sample_in_order(name, shard, stages):
    batch = _batch_for(name, shard, stages)
    keys = [s.key for s in batch]
    out = stages[name](batch)
    assert [s.key for s in out] == keys
    assert all(s.status is Status.KEPT or s.drop_reason is not None for s in out)


@pytest.mark.parametrize("name", list(STAGES))
def test_pickled_before_setup_the_stage_computes_the_same(name, shard, stages, tiny_teacher,
                                                          teacher_overrides):
    """What the orchestrator ships to a Ray worker: the stage built, not yet set up."""
    fresh = stage_spec(name).stage_class(_config(name, tiny_teacher, teacher_overrides))
    shipped = pickle.loads(pickle.dumps(fresh))
    assert type(shipped) is type(fresh) and shipped.config == fresh.config
    shipped.setup()
    ours, theirs = _batch_for(name, shard, stages), _batch_for(name, shard, stages)
    stages[name](ours)
    shipped(theirs)
    assert encode_shard(ours) == encode_shard(theirs)
    assert stats_table(ours).equals(stats_table(theirs))


@pytest.mark.parametrize("name", list(STAGES))
def test_config_and_statistics_round_trip(name, shard, stages, tiny_teacher, teacher_overrides):
    cfg = _config(name, tiny_teacher, teacher_overrides)
    data = json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(type(cfg), data) == cfg
    batch = _batch_for(name, shard, stages)
    stages[name](batch)
    stats = json.loads(json.dumps(shard_stats(batch, shard="00000", duration_s=1.0)))
    assert stats["read"] == stats["kept"] + stats["dropped"] == len(batch)
    merged = merge_stats([stats, {**copy.deepcopy(stats), "shard": "00001"}])
    assert merged["read"] == 2 * len(batch) and merged["kept"] == 2 * stats["kept"]
    own = getattr(stages[name], "stats", None)       # a stage's own counters, if it keeps any
    if own is not None:
        assert json.loads(json.dumps(own)) == own
