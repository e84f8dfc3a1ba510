"""The assembled GLIP: the contract of its outputs, its parts, CPU forward passes of every config."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import load_model_config
from model.glip import build_glip


def _millions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)


def _check_outputs(out: dict, batch: int, tokens: int, hw: tuple[int, int], channels: int, text_dim: int):
    sizes = [(-(-hw[0] // 8), -(-hw[1] // 8))]          # P3 at stride 8, then halved (ceil)
    while len(sizes) < 5:
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    assert [tuple(t.shape) for t in out["token_logits"]] == [(batch, a * b, tokens) for a, b in sizes]
    assert [tuple(t.shape) for t in out["box_regression"]] == [(batch, 4, a, b) for a, b in sizes]
    assert [tuple(t.shape) for t in out["centerness"]] == [(batch, 1, a, b) for a, b in sizes]
    assert [tuple(t.shape) for t in out["visual"]] == [(batch, channels, a, b) for a, b in sizes]
    assert [tuple(t.shape) for t in out["anchors"]] == [(a * b, 4) for a, b in sizes]
    assert tuple(out["text_hidden"].shape) == (batch, tokens, text_dim)
    for key in ("token_logits", "box_regression", "centerness"):
        assert all(torch.isfinite(t).all() for t in out[key])


def test_children_follow_the_state_dict_contract(tiny_model):
    assert [name for name, _ in tiny_model.named_children()] == ["backbone", "language", "head", "anchor_generator"]
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in tiny_model.state_dict()}
    assert prefixes == {"backbone.body", "backbone.fpn", "language.model", "head.blocks", "head.bbox_pred",
                        "head.centerness", "head.token_proj", "head.scales", "head.log_scale", "head.bias_lang",
                        "head.bias0", "anchor_generator.cell_anchors"}


def test_tiny_forward(tiny_model):
    enc = tiny_model.tokenize(["a person. a necktie. a flag", "cat"])
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = tiny_model(images, [(64, 96), (50, 70)], enc["input_ids"], enc["attention_mask"])
    _check_outputs(out, 2, enc["input_ids"].shape[1], (64, 96), 64, 384)
    assert out["image_sizes"] == [(64, 96), (50, 70)]
    with pytest.raises(ValueError, match="batch mismatch"):
        tiny_model(images, [(64, 96)], enc["input_ids"], enc["attention_mask"])


def test_prompt_padding_and_batching_do_not_change_real_token_logits(tiny_model):
    """One 256-token prompt (official PAD_MAX) == the same prompt padded to the batch's longest
    == alone: logits of real tokens agree, so pad_to_max=false is a pure speed-up."""
    captions = ["a person. a necktie. a flag", "cat"]
    images = torch.randn(2, 3, 64, 64)
    sizes = [(64, 64), (64, 64)]
    enc = tiny_model.tokenize(captions)
    padded_model = _with_language(tiny_model, pad_to_max=True)
    full = padded_model.tokenize(captions)
    assert full["input_ids"].shape[1] == 256
    with torch.no_grad():
        batched = tiny_model(images, sizes, enc["input_ids"], enc["attention_mask"])["token_logits"]
        padded = tiny_model(images, sizes, full["input_ids"], full["attention_mask"])["token_logits"]
        for i, caption in enumerate(captions):
            one = tiny_model.tokenize([caption])
            n = one["input_ids"].shape[1]
            alone = tiny_model(images[i:i + 1], sizes[i:i + 1], one["input_ids"], one["attention_mask"])["token_logits"]
            for level in range(5):
                torch.testing.assert_close(batched[level][i, :, :n], alone[level][0], rtol=0, atol=1e-4)
                torch.testing.assert_close(padded[level][i, :, :n], alone[level][0], rtol=0, atol=1e-4)


def test_parameter_counts_match_the_official_models():
    """Spec §9 (official counts; ours lack only the unused 80-class ``cls_logits``)."""
    t = build_glip(load_model_config("glip_t"), device="meta")
    assert _millions(t.backbone.body) == 27.52 and _millions(t.backbone.fpn) == 3.30
    assert _millions(t.language) == 108.89 and _millions(t.head.blocks) == 91.85
    assert _millions(t) == 231.76
    assert _millions(build_glip(load_model_config("glip_l"), device="meta")) == 430.40
    assert _millions(build_glip(load_model_config("glip_t", ["head.fusion=none"]), device="meta")) == 151.41


@pytest.mark.slow
@pytest.mark.parametrize("name", ["glip_t", "glip_l"])
def test_official_configs_forward_on_cpu(name):
    """The real GLIP-T / GLIP-L configs (random weights) on a small image. Prompts are padded to
    the longest (pad_to_max=false, equivalent on real tokens, see above) to keep CPU time down."""
    torch.manual_seed(0)
    model = build_glip(load_model_config(name, ["language.pad_to_max=false"])).eval()
    enc = model.tokenize(["a person. a dog on a skateboard"])
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96), [(60, 90)], enc["input_ids"], enc["attention_mask"])
    _check_outputs(out, 1, enc["input_ids"].shape[1], (64, 96), 256, 768)


def _with_language(model, **changes):
    """The same model with changed language settings (shares every weight)."""
    clone = type(model).__new__(type(model))
    clone.__dict__.update(model.__dict__)
    clone._modules = dict(model._modules)
    language = type(model.language).__new__(type(model.language))
    language.__dict__.update(model.language.__dict__)
    language.cfg = dataclasses.replace(model.language.cfg, **changes)
    clone._modules["language"] = language
    return clone
