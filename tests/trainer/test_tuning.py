"""What each ``tuning`` trains (exactly the tensors it names), the prompt-tuning module and its
round trip through a checkpoint, and the fixed class-name prompt it is trained on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.prompt_tuning import PromptTuning
from trainer.config import TrainConfig, model_config
from trainer.tuning import LINEAR_PROBE, Tuning, apply_tuning, trainable_names


@pytest.fixture(scope="module")
def tiny():
    from model.config import load_model_config
    from model.glip import build_glip

    torch.manual_seed(0)
    return build_glip(load_model_config("tiny", ["input.min_size_test=64", "input.max_size_test=96"]),
                      load_weights=False)


def _fresh(model):
    import copy
    fresh = copy.deepcopy(model)
    fresh.prompt_tuning = None
    for p in fresh.parameters():
        p.requires_grad_(True)
    return fresh


def test_each_tuning_trains_exactly_the_tensors_it_names(tiny):
    every = [n for n, _ in tiny.named_parameters()]
    head = [n for n in every if n.startswith("head.")]

    assert trainable_names(apply_tuning(_fresh(tiny), Tuning.FULL)) == every
    assert trainable_names(apply_tuning(_fresh(tiny), Tuning.PROMPT)) == ["prompt_tuning.weight"]
    assert trainable_names(apply_tuning(_fresh(tiny), Tuning.HEAD)) == head
    probe = trainable_names(apply_tuning(_fresh(tiny), Tuning.LINEAR_PROBE))
    assert probe == ["head.log_scale", "head.bias_lang", "head.bias0", "head.bbox_pred.weight", "head.bbox_pred.bias",
                     "head.centerness.weight", "head.centerness.bias", "head.token_proj.weight", "head.token_proj.bias"]
    assert all(any(n.startswith(p) for p in LINEAR_PROBE) for n in probe)
    # full keeps what the model config froze
    frozen = _fresh(tiny)
    frozen.backbone.body.requires_grad_(False)
    assert not any(n.startswith("backbone.body") for n in trainable_names(apply_tuning(frozen, Tuning.FULL)))


def test_tunings_but_full_run_the_text_encoder_frozen():
    assert model_config(TrainConfig(tuning=Tuning.FULL)).language.freeze is False
    for tuning in (Tuning.PROMPT, Tuning.LINEAR_PROBE, Tuning.HEAD):
        assert model_config(TrainConfig(tuning=tuning)).language.freeze is True


def test_a_zero_prompt_changes_nothing_and_a_learnt_one_is_used(tiny):
    model = _fresh(tiny).eval()
    images = torch.randn(1, 3, 64, 96)
    enc = model.tokenize(["red square. blue circle"])
    with torch.no_grad():
        plain = model(images, [(64, 96)], enc["input_ids"], enc["attention_mask"])["token_logits"][0]
        model.prompt_tuning = PromptTuning(256, model.language.hidden_size)
        zero = model(images, [(64, 96)], enc["input_ids"], enc["attention_mask"])["token_logits"][0]
        model.prompt_tuning.weight.normal_()
        learnt = model(images, [(64, 96)], enc["input_ids"], enc["attention_mask"])["token_logits"][0]
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, learnt)


def test_a_learnt_prompt_goes_through_a_checkpoint_to_eval_and_predict(tiny, tmp_path):
    from model.checkpoint import save_pretrained
    from model.load import load_glip
    from model.predictor import Predictor
    from model.prompt_tuning import save_names

    model = apply_tuning(_fresh(tiny), Tuning.PROMPT)
    with torch.no_grad():
        model.prompt_tuning.weight.normal_()
    save_pretrained(model, tmp_path / "m")
    loaded, _ = load_glip(str(tmp_path / "m"))
    assert torch.equal(loaded.prompt_tuning.weight, model.prompt_tuning.weight)
    predictor = Predictor.from_pretrained(tmp_path / "m")
    assert torch.equal(predictor.model.prompt_tuning.weight, model.prompt_tuning.weight)
    # the classes it was learnt for go with it; detecting other classes is refused
    save_names(tmp_path / "m", ["red square", "blue circle"])
    predictor = Predictor.from_pretrained(tmp_path / "m")
    assert predictor.model.prompt_tuning.names == ["red square", "blue circle"]
    with pytest.raises(ValueError, match=r"learnt prompt belongs to the classes \['red square', 'blue circle'\]"):
        predictor.detect([], ["blue circle", "red square"])
    assert predictor.detect([], ["red square", "blue circle"]) == []


def test_the_fixed_prompt_is_the_evaluation_prompt(tiny):
    from model.prompts import build_prompt
    from stages.schema import Sample
    from trainer.data.prompts import DetectionPromptConfig, PromptSampling, detection_to_grounding

    names = {3: "red square", 1: "blue circle", 2: "green_triangle"}
    sample = Sample(key="a", input_shard="", boxes=[[0, 0, 5, 5], [1, 1, 4, 4]], meta={"category_ids": [2, 3]})
    out = detection_to_grounding(sample, names, tiny.tokenizer, np.random.default_rng(0),
                                 DetectionPromptConfig(sampling=PromptSampling.FIXED))
    expected = build_prompt(list(names.values()))
    assert out.caption == expected.caption == "red square. blue circle. green triangle"
    assert [out.caption[s:e] for [[s, e]] in out.tokens_positive] == ["green triangle", "red square"]
    assert out.meta["prompt_category_ids"] == [3, 1, 2]


def test_prompt_tuning_refuses_sampled_prompts():
    from trainer.data.config import SourceKind, TrainDataConfig, TrainSourceConfig
    from trainer.data.prompts import DetectionPromptConfig, PromptSampling

    def cfg(sampling):
        source = TrainSourceConfig(kind=SourceKind.COCO, annotations="a.json", image_root="img",
                                   prompt=DetectionPromptConfig(sampling=sampling))
        return TrainConfig(tuning=Tuning.PROMPT, output="out", data=TrainDataConfig(sources={"det": source}))

    with pytest.raises(ValueError, match=r"data.sources \['det'\]: set data.sources.NAME.prompt.sampling=fixed"):
        cfg(PromptSampling.SAMPLED).validate()
    cfg(PromptSampling.FIXED).validate()
