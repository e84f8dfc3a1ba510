"""Precision policy, channels_last and torch.compile of the teacher, on CPU (bf16 autocast works there)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from core.device import Precision
from model.config import load_model_config
from model.glip import build_glip
from stages.label_agreement import compare_labels
from stages.pseudo_label import Compile, PseudoLabel, PseudoLabelConfig
from stages.teacher_precision import PrecisionPolicy, apply_policy


def _run(model, images, enc, dtype=torch.bfloat16):
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        return model(images, [(64, 96)] * 2, enc["input_ids"], enc["attention_mask"])


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = build_glip(load_model_config("tiny", ["head.log_scale=-2.5"])).eval()
    enc = model.tokenizer(["a red ball", "two dogs in a park"], padding="longest", return_tensors="pt")
    return model, torch.randn(2, 3, 64, 96), enc


def test_policies_keep_their_modules_in_fp32(small):
    model, images, enc = small
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, (o[0] if isinstance(o, (list, tuple)) else o).dtype))
        for n in ("backbone", "head.token_proj")]
    try:
        _run(model, images, enc)
        assert seen == {"backbone": torch.bfloat16, "head.token_proj": torch.bfloat16}
        apply_policy(model, PrecisionPolicy.FP32_BACKBONE)
        apply_policy(model, PrecisionPolicy.FP32_BACKBONE)            # idempotent
        _run(model, images, enc)
        assert seen == {"backbone": torch.float32, "head.token_proj": torch.bfloat16}
    finally:
        for h in hooks:
            h.remove()
        vars(model.backbone).pop("forward", None)


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory):
    from model.checkpoint import save_pretrained

    torch.manual_seed(0)
    model = build_glip(load_model_config("tiny", ["head.log_scale=-2.5"]))
    return save_pretrained(model, tmp_path_factory.mktemp("sharp") / "tiny")


def test_bf16_labels_with_the_backbone_in_fp32_agree_with_fp32(sharp_teacher, teacher_overrides,
                                                                synthetic_shards, run_shard):
    root, _ = synthetic_shards
    path = sorted(root.glob("*.tar"))[1]
    cfg = PseudoLabelConfig(checkpoint=str(sharp_teacher), model_overrides=teacher_overrides, min_score=0.1,
                            batch_size=4, cpu_workers=2)
    runs = {}
    for precision in (Precision.FP32, Precision.BF16):
        stage = PseudoLabel(dataclasses.replace(cfg, precision=precision))
        stage.setup()
        runs[precision] = stage(run_shard(path).samples)
    agreement = compare_labels(runs[Precision.FP32], runs[Precision.BF16])
    # measured 0.94 (benchmarks/RESULTS.md): below the 98% goal, hence fp32 by default
    assert agreement.boxes > 50 and agreement.fraction >= 0.85 and agreement.drop_mismatches == []


def test_channels_last_gives_the_same_outputs(small):
    model, images, enc = small
    with torch.inference_mode():
        ref = model(images, [(64, 96)] * 2, enc["input_ids"], enc["attention_mask"])
        model.backbone.to(memory_format=torch.channels_last)
        try:
            out = model(images.contiguous(memory_format=torch.channels_last), [(64, 96)] * 2,
                        enc["input_ids"], enc["attention_mask"])
        finally:
            model.backbone.to(memory_format=torch.contiguous_format)
    for a, b in zip(out["token_logits"], ref["token_logits"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compile_is_configured_not_run_on_cpu(tiny_teacher, teacher_overrides):
    # torch.compile on this 2-core CPU takes minutes: the plumbing is tested, the speed on a GPU
    stage = PseudoLabel(PseudoLabelConfig(checkpoint=str(tiny_teacher), model_overrides=teacher_overrides,
                                          compile=Compile.MAX_AUTOTUNE, channels_last=True))
    stage.setup()
    assert stage.forward is not stage.model and getattr(stage.forward, "_orig_mod", None) is stage.model
    assert next(stage.model.backbone.parameters()).dim() != 4 or \
        any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            for p in stage.model.backbone.parameters() if p.dim() == 4)
    assert PseudoLabelConfig().compile is Compile.NONE and PseudoLabelConfig().precision is Precision.FP32
