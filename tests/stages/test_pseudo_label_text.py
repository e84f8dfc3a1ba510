"""Prompts padded to the batch's longest prompt label as the official 256-token padding does."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import load_model_config
from model.glip import build_glip
from stages.label_agreement import compare_labels
from stages.pseudo_label import PseudoLabel, PseudoLabelConfig, TextPadding


def test_padding_to_the_longest_prompt_keeps_the_real_tokens_logits():
    torch.manual_seed(0)
    model = build_glip(load_model_config("tiny", ["head.log_scale=-2.5"])).eval()
    captions = ["a red ball on a white table", "two dogs", "a man riding a horse on the beach at dusk"]
    tok = model.tokenizer
    images = torch.randn(3, 3, 96, 128)
    outs = {}
    with torch.inference_mode():
        for padding in ("longest", "max_length"):
            enc = tok(captions, padding=padding, max_length=256, truncation=True, return_tensors="pt")
            outs[padding] = (model(images, [(96, 128)] * 3, enc["input_ids"], enc["attention_mask"]), enc)
    short, enc = outs["longest"]
    full, _ = outs["max_length"]
    t = enc["input_ids"].shape[1]
    assert t < 20 and full["token_logits"][0].shape[-1] == 256
    mask = enc["attention_mask"].bool()
    for a, b in zip(short["token_logits"], full["token_logits"]):
        real = mask[:, None, :].expand_as(a)
        torch.testing.assert_close(a[real], b[..., :t][real], atol=2e-4, rtol=1e-4)
    for key in ("box_regression", "centerness"):
        for a, b in zip(short[key], full[key]):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def stage(tiny_teacher, teacher_overrides):
    st = PseudoLabel(PseudoLabelConfig(checkpoint=str(tiny_teacher), model_overrides=teacher_overrides,
                                       min_score=0.06, batch_size=4, cpu_workers=2))
    st.setup()
    return st


def test_stage_labels_equal_with_both_paddings(stage, synthetic_shards, run_shard):
    root, _ = synthetic_shards
    path = sorted(root.glob("*.tar"))[1]
    runs = {}
    for padding in TextPadding:
        samples = run_shard(path).samples
        saved = stage.config
        stage.config = dataclasses.replace(saved, text_padding=padding)
        try:
            stage(samples)
        finally:
            stage.config = saved
        runs[padding] = samples
    agreement = compare_labels(runs[TextPadding.MAX], runs[TextPadding.LONGEST], iou_min=0.99, score_tol=1e-3)
    assert agreement.boxes > 50 and agreement.fraction >= 0.99 and agreement.drop_mismatches == []
