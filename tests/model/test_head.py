import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

import model.head as head_module
from model.config import FusionKind, ModelConfig
from model.head import VLDyHead
from model.text_layer import TextLayer

C, D, T = 16, 24, 7
PYRAMIDS = [[(8, 10), (4, 5), (2, 3), (1, 2), (1, 1)],
            [(5, 7), (3, 4), (2, 2), (1, 1), (1, 1)],
            [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]]


def tiny_cfg(fusion=FusionKind.MHA_B, blocks=2, dropout=0.1, checkpointing=False) -> ModelConfig:
    cfg = ModelConfig()
    cfg.fpn.out_channels = cfg.head.channels = cfg.head.token_dim = C
    cfg.head.num_blocks = blocks
    cfg.head.fusion = fusion
    cfg.head.fusion_embed_dim, cfg.head.fusion_heads = 32, 4
    cfg.head.fusion_dropout = dropout
    cfg.head.group_norm_groups = 4
    cfg.head.gradient_checkpointing = checkpointing
    return cfg


def text_cfg(dropout=0.1) -> BertConfig:
    return BertConfig(hidden_size=D, num_attention_heads=4, intermediate_size=48,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def make_head(seed=0, **kw) -> VLDyHead:
    torch.manual_seed(seed)
    dropout = kw.pop("text_dropout", 0.1)
    head = VLDyHead(tiny_cfg(**kw), text_cfg(dropout)).eval()
    with torch.no_grad():   # make the prediction layers and token bias non-trivial
        head.bbox_pred.weight.normal_(0, 0.3)
        head.centerness.weight.normal_(0, 0.3)
        head.bias_lang.normal_(0, 0.5)
        head.log_scale.fill_(0.3)
    return head


def make_inputs(sizes=PYRAMIDS[0], batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, C, h, w, generator=g) for h, w in sizes]
    text = torch.randn(batch, T, D, generator=g)
    mask = torch.ones(batch, T, dtype=torch.long)
    mask[1, 4:] = 0
    return feats, text, mask


@pytest.mark.parametrize("sizes", PYRAMIDS)
def test_output_shapes(sizes):
    out = make_head()(*make_inputs(sizes))
    assert set(out) == {"token_logits", "box_regression", "centerness", "text_hidden", "visual"}
    for (h, w), lg, rg, ct, vis in zip(sizes, out["token_logits"], out["box_regression"],
                                       out["centerness"], out["visual"]):
        assert lg.shape == (2, h * w, T)
        assert rg.shape == (2, 4, h, w) and ct.shape == (2, 1, h, w) and vis.shape == (2, C, h, w)
    assert out["text_hidden"].shape == (2, T, D)


def assert_outputs_close(a, b, atol=1e-5, real_tokens=None):
    for key in ("box_regression", "centerness", "visual"):
        for x, y in zip(a[key], b[key]):
            assert torch.allclose(x, y, atol=atol), key
    for x, y in zip(a["token_logits"], b["token_logits"]):
        sl = slice(None) if real_tokens is None else slice(0, real_tokens)
        assert torch.allclose(x[..., sl], y[..., sl], atol=atol), "token_logits"


@pytest.mark.parametrize("fusion", [FusionKind.MHA_B, FusionKind.NONE])
def test_batched_equals_per_item(fusion):
    head = make_head(fusion=fusion)
    feats, text, mask = make_inputs()
    out = head(feats, text, mask)
    for i in range(2):
        single = head([f[i:i + 1] for f in feats], text[i:i + 1], mask[i:i + 1])
        sliced = {k: [x[i:i + 1] for x in v] if isinstance(v, list) else v[i:i + 1] for k, v in out.items()}
        assert_outputs_close(sliced, single)


@pytest.mark.parametrize("fusion", [FusionKind.MHA_B, FusionKind.NONE])
def test_padded_tokens_do_not_change_outputs(fusion):
    head = make_head(fusion=fusion)
    feats, text, mask = make_inputs()
    out = head(feats, text, mask)
    text2 = text.clone()
    text2[1, 4:] = 50 * torch.randn(3, D)
    out2 = head(feats, text2, mask)
    assert_outputs_close(out, out2, real_tokens=4)
    assert torch.allclose(out["text_hidden"][:, :4], out2["text_hidden"][:, :4], atol=1e-5)


def test_token_logits_formula():
    head = make_head(blocks=0)   # no tower: the logits see the inputs directly
    feats, text, mask = make_inputs()
    out = head(feats, text, mask)
    e = F.normalize(text, dim=-1)
    tokens = F.linear(e / 2.0, head.token_proj.weight, head.token_proj.bias)
    bias = e @ head.bias_lang + head.bias0
    for x, logits in zip(feats, out["token_logits"]):
        q = x.flatten(2).transpose(1, 2)                                    # (y, x) row-major
        expected = q @ tokens.transpose(1, 2) / math.exp(0.3) + bias[:, None, :]
        assert torch.allclose(logits, expected, atol=1e-5)
    big = head([1e9 * f for f in feats], text, mask)["token_logits"][0]
    assert big.abs().max() == 50000


def test_without_fusion_the_masked_language_features_are_used():
    head = make_head(fusion=FusionKind.NONE, blocks=1)
    assert {k.split(".")[2] for k in head.state_dict() if k.startswith("blocks.")} == {"dyconv"}
    feats, text, mask = make_inputs()
    out = head(feats, text, mask)
    assert torch.equal(out["text_hidden"], text)
    # a padded token's embedding is zeroed (official ``embedded``): its projection is the bare
    # token_proj bias and its token bias is bias0
    x = out["visual"][0][1].flatten(1).t()                                   # [H*W, C]
    expected = x @ head.token_proj.bias / math.exp(0.3) + head.bias0
    assert torch.allclose(out["token_logits"][0][1, :, 5], expected, atol=1e-5)


def test_init_and_state_dict_names():
    torch.manual_seed(0)
    head = VLDyHead(tiny_cfg(blocks=2), text_cfg())
    assert head.bias0.item() == pytest.approx(-math.log(99))
    assert head.log_scale.item() == 0.0 and torch.all(head.bias_lang == 0)
    assert all(s.scale.item() == 1.0 for s in head.scales)
    assert torch.all(head.bbox_pred.bias == 0) and head.bbox_pred.weight.std() < 0.05
    assert head.blocks[1].fusion.gamma_v[0].item() == pytest.approx(0.5)
    names = set(head.state_dict())
    top = {n for n in names if not n.startswith("blocks.")}
    assert top == {"bbox_pred.weight", "bbox_pred.bias", "centerness.weight", "centerness.bias",
                   "token_proj.weight", "token_proj.bias", "log_scale", "bias_lang", "bias0"} | {
        f"scales.{l}.scale" for l in range(5)}
    for i in range(2):
        assert f"blocks.{i}.fusion.attn.v_proj.weight" in names
        assert f"blocks.{i}.text_layer.attention.self.query.weight" in names
        assert f"blocks.{i}.dyconv.convs.2.norm.bias" in names
    assert head.token_proj.weight.shape == (C, D)


def test_text_layer_equals_hf_bert_layer_when_no_clamp_triggers():
    cfg = text_cfg()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = BertLayer(cfg).eval()
    ours = TextLayer(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, T, D)
    mask = torch.ones(2, T)
    mask[1, 4:] = 0
    ext = (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
    expected = ref(x, attention_mask=ext)
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert torch.allclose(ours(x, mask), expected, atol=1e-5)
    with torch.no_grad():   # the intermediate activation is clamped at 50000
        ours.intermediate.dense.weight.fill_(1e6)
    assert ours.intermediate(x).abs().max() <= 50000


def test_gradient_checkpointing_same_gradients(monkeypatch):
    feats, text, mask = make_inputs([(4, 5), (2, 3), (1, 2), (1, 1), (1, 1)])
    grads = []
    calls = []
    real = head_module.checkpoint
    monkeypatch.setattr(head_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for ckpt in (False, True):
        head = make_head(dropout=0.0, text_dropout=0.0, checkpointing=ckpt).train()
        out = head(feats, text, mask)
        loss = sum(x.sum() for x in out["token_logits"]) + sum(x.pow(2).sum() for x in out["box_regression"])
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in head.parameters() if p.grad is not None]))
    assert len(calls) == 2                                                  # once per fusion block
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    head.eval()
    head(feats, text, mask)
    assert len(calls) == 2                                                  # not in eval


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_finite(dtype):
    head = make_head()
    feats, text, mask = make_inputs()
    with torch.autocast("cpu", dtype=dtype):
        out = head([10 * f for f in feats], 10 * text, mask)
    for key in ("token_logits", "box_regression", "centerness", "visual"):
        assert all(torch.isfinite(x).all() for x in out[key]), key
