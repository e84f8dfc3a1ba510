"""Noun phrases from web alt-text: a phrase needs a letter, and tag lists, stock-photo boilerplate
and abstract "concept" nouns are not phrases (measured in benchmarks/noun_phrase_junk.py)."""
from __future__ import annotations

import json
from pathlib import Path

from stages.noun_phrases import ALT_TEXT_BLOCKLIST, DEFAULT_BLOCKLIST, NounPhraseConfig, NounPhrases
from stages.schema import DropReason, Sample

CAPTIONS = Path(__file__).parent / "data" / "alt_text_captions.json"


def _phrases(stage, caption: str) -> tuple[list[str], DropReason | None]:
    sample = Sample(key="k", input_shard="s", caption=caption)
    stage([sample])
    return [p.text for p in sample.phrases], sample.drop_reason


def test_an_emoji_caption_has_no_phrase(noun_phrase_stage):
    assert _phrases(noun_phrase_stage, "🙂🙂🙂 !!!") == ([], DropReason.NO_PHRASES)


def test_tags_urls_file_names_and_boilerplate_are_not_phrases(noun_phrase_stage):
    phrases, _ = _phrases(noun_phrase_stage, "a dog playing with a ball in the park #dogsofinstagram #puppy")
    assert phrases == ["a dog", "a ball", "the park"]
    assert _phrases(noun_phrase_stage, "IMG_2045.JPG")[1] is DropReason.NO_PHRASES
    phrases, _ = _phrases(noun_phrase_stage, "Wallpaper HD 1920x1080 of a tiger in the jungle")
    assert phrases == ["a tiger", "the jungle"]
    phrases, _ = _phrases(noun_phrase_stage, "Royalty free vector illustration of a red apple on white background")
    assert phrases == ["a red apple"]


def test_the_alt_text_set_keeps_real_phrases_and_little_junk(noun_phrase_stage):
    items = json.loads(CAPTIONS.read_text())
    assert len(items) >= 40

    def count(stage) -> tuple[int, int]:
        samples = [Sample(key=str(i), input_shard="alt", caption=it["caption"]) for i, it in enumerate(items)]
        stage(samples)
        real = junk = 0
        for sample, item in zip(samples, items):
            for p in sample.phrases:
                if any(w.lower() in p.text.lower() for w in item["visual"]):
                    real += 1
                else:
                    junk += 1
        return real, junk

    before = NounPhrases(NounPhraseConfig(blocklist=[w for w in DEFAULT_BLOCKLIST if w not in ALT_TEXT_BLOCKLIST],
                                          min_letters=0, junk_pattern=""))
    before.nlp, before.model_name = noun_phrase_stage.nlp, noun_phrase_stage.model_name
    real_before, junk_before = count(before)
    real_after, junk_after = count(noun_phrase_stage)
    assert junk_after <= 3 < 30 <= junk_before                # 33 -> 3 when measured
    assert real_after >= real_before - 4                       # the hashtag-tied ones and two "... template/design"
