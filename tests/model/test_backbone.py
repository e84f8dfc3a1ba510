"""Swin (official detection variant), the timm backbone wrapper and the FPN."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from model.backbone import TimmBackbone, build_backbone, load_timm_weights, package_weights
from model.swin import SwinBlock, SwinTransformer, load_swin_imagenet, shift_attention_mask
from model.config import SwinConfig, load_model_config
from model.fpn import FPN

SMALL_SWIN = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                        drop_path_rate=0.0)


def _perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)   # non-trivial norms and biases
    return module.eval()


def test_swin_equals_timm_where_both_implementations_agree():
    """At sizes where every stage is a window multiple (224 x 448 here), padding and the roll/pad
    order do not matter, and timm (full windows kept) must compute exactly what we compute."""
    from timm.models.swin_transformer import SwinTransformer as TimmSwin, checkpoint_filter_fn
    ours = _perturbed(SwinTransformer(SMALL_SWIN))
    ref = TimmSwin(img_size=224, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                   always_partition=True, strict_img_size=False).eval()
    sd = {k: v for k, v in ours.state_dict().items() if not k.startswith(("norm1", "norm2", "norm3"))}
    missing = ref.load_state_dict(checkpoint_filter_fn(sd, ref), strict=False).missing_keys
    assert sorted(missing) == ["head.fc.bias", "head.fc.weight", "norm.bias", "norm.weight"]
    x = torch.randn(1, 3, 224, 448)
    with torch.no_grad():
        ours_out = ours(x)
        ref_out = ref.forward_intermediates(x, intermediates_only=True)[1:]
    for i, (a, b) in enumerate(zip(ours_out, ref_out)):
        norm = getattr(ours, f"norm{i + 1}")
        b = F.layer_norm(b.permute(0, 2, 3, 1), (b.shape[1],), norm.weight, norm.bias).permute(0, 3, 1, 2)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_swin_block_pads_after_norm1_then_rolls_the_padded_map():
    """The official order: zero-pad the normalised map to a window multiple, then roll it (timm
    rolls first). With norm1's bias at 0, LayerNorm maps all-zero input tokens to exactly 0, so
    padding the *input* with zero tokens must give the same result on the real tokens."""
    blk = _perturbed(SwinBlock(16, 2, 7, 3, 4.0, 0.0))
    with torch.no_grad():
        blk.norm1.bias.zero_()
    H, W, C = 10, 12, 16
    x = torch.randn(1, H * W, C)
    mask = shift_attention_mask(14, 14, 7, 3, torch.device("cpu"))
    padded = F.pad(x.view(1, H, W, C), (0, 0, 0, 14 - W, 0, 14 - H)).view(1, 14 * 14, C)
    with torch.no_grad():
        out = blk(x, H, W, mask).view(1, H, W, C)
        ref = blk(padded, 14, 14, mask).view(1, 14, 14, C)[:, :H, :W]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(64, 96), (37, 53), (100, 75)])
def test_swin_any_input_size(size):
    body = _perturbed(SwinTransformer(SMALL_SWIN))
    with torch.no_grad():
        outs = body(torch.randn(2, 3, *size))
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    for i, out in enumerate(outs):
        h, w = (h + 1) // 2, (w + 1) // 2
        assert out.shape == (2, 32 * 2 ** (i + 1), h, w)
        assert torch.isfinite(out).all()


def test_swin_batched_equals_per_item():
    body = _perturbed(SwinTransformer(SMALL_SWIN))
    x = torch.randn(3, 3, 50, 70)
    with torch.no_grad():
        batched = body(x)
        single = [body(x[i:i + 1]) for i in range(3)]
    for level, out in enumerate(batched):
        torch.testing.assert_close(out, torch.cat([s[level] for s in single]), rtol=0, atol=1e-5)


def test_shift_mask_separates_rolled_regions():
    ws, shift = 7, 3
    mask = shift_attention_mask(14, 21, ws, shift, torch.device("cpu"))
    assert mask.shape == (2 * 3, ws * ws, ws * ws)
    assert set(mask.unique().tolist()) <= {0.0, -100.0}
    assert torch.equal(mask, mask.transpose(1, 2))
    assert (mask[0] == 0).all()                         # the top-left window holds one region
    # the bottom-right window holds 4 regions: token (0, 0) and token (6, 6) may not attend
    assert mask[-1, 0, ws * ws - 1] == -100.0
    # a map of one window still gets a shifted mask (no window shrinking, as the official)
    assert (shift_attention_mask(7, 7, ws, shift, torch.device("cpu")) != 0).any()


def test_swin_frozen_stages_stay_frozen_in_train_mode():
    body = SwinTransformer(SMALL_SWIN, frozen_stages=1).train()
    assert not any(p.requires_grad for p in body.patch_embed.parameters())
    assert not any(p.requires_grad for p in body.layers[0].parameters())
    assert all(p.requires_grad for p in body.layers[1].parameters())
    assert not body.layers[0].training and body.layers[1].training


def test_load_swin_imagenet_checkpoint(tmp_path):
    src = _perturbed(SwinTransformer(SMALL_SWIN))
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith(("norm1", "norm2", "norm3"))}
    sd.update({"norm.weight": torch.ones(256), "norm.bias": torch.zeros(256),
               "head.weight": torch.zeros(10, 256), "head.bias": torch.zeros(10),
               "layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49)})
    torch.save({"model": sd}, tmp_path / "swin.pth")
    body = SwinTransformer(SMALL_SWIN)
    left = load_swin_imagenet(body, tmp_path / "swin.pth")
    assert sorted(left) == sorted(f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias"))
    assert torch.equal(body.layers[2].blocks[1].mlp.fc2.weight, src.layers[2].blocks[1].mlp.fc2.weight)
    sd["layers.0.blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="layers.0.blocks.0.mlp.fc1.weight"):
        load_swin_imagenet(SwinTransformer(SMALL_SWIN), tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------ timm

def test_timm_backbone_strides_channels_and_bgr_flip():
    body = TimmBackbone("efficientnet_lite0").eval()
    assert body.out_channels == [40, 112, 320]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs = body(x)
        ref = body.model(x.flip(1))                     # the timm model sees RGB
    assert [o.shape[-2:] for o in outs] == [(8, 12), (4, 6), (2, 3)]
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)


def test_timm_backbone_freezing_and_batchnorm_statistics():
    body = TimmBackbone("efficientnet_lite0", frozen_stages=1).train()
    assert not any(p.requires_grad for p in body.model.conv_stem.parameters())
    assert not any(p.requires_grad for p in body.model.blocks[0].parameters())
    assert all(p.requires_grad for p in body.model.blocks[1].parameters())
    before = body.model.blocks[2][0].bn1.running_mean.clone()
    body(torch.randn(2, 3, 64, 64))
    assert torch.equal(body.model.blocks[2][0].bn1.running_mean, before)    # frozen statistics


def test_timm_backbone_rejects_missing_strides():
    with pytest.raises(ValueError, match="strides"):
        TimmBackbone("efficientnet_lite0", strides=(8, 16, 64))


def test_packaged_efficientnet_weights_recognise_a_photo(photo):
    """The package's tensors mapped by position give a working ImageNet classifier with the tiny
    config's normalisation (RGB, (x - 127) / 128): Grace Hopper -> "military uniform" (652)."""
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(package_weights("pkg:efficientnet_lite0"))
    cfg = load_model_config("tiny").input
    x = torch.from_numpy(np.array(photo.resize((224, 262)))).permute(2, 0, 1).float()[None]
    mean = torch.tensor(cfg.pixel_mean[::-1])[:, None, None]   # config is BGR; x is RGB
    std = torch.tensor(cfg.pixel_std[::-1])[:, None, None]
    with torch.no_grad():
        probs = model((x - mean) / std).softmax(-1)[0]
    assert probs.argmax().item() == 652


def test_tiny_backbone_loads_packaged_weights():
    backbone = build_backbone(load_model_config("tiny"))
    ref = package_weights("pkg:efficientnet_lite0")
    for name, tensor in backbone.body.model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


def test_package_weights_fail_loudly_on_a_shape_mismatch(monkeypatch):
    real_load = torch.load

    def corrupted(*args, **kwargs):
        sd = real_load(*args, **kwargs)
        key = next(iter(sd))
        sd[key] = torch.zeros(1)
        return sd

    monkeypatch.setattr(torch, "load", corrupted)
    with pytest.raises(ValueError, match="does not match timm"):
        package_weights("pkg:efficientnet_lite0")


def test_load_timm_weights_from_a_local_file(tmp_path):
    src = TimmBackbone("efficientnet_lite0")
    with torch.no_grad():
        src.model.conv_stem.weight.fill_(0.5)
    torch.save(src.model.state_dict(), tmp_path / "w.pth")
    dst = TimmBackbone("efficientnet_lite0")
    load_timm_weights(dst, tmp_path / "w.pth")
    assert (dst.model.conv_stem.weight == 0.5).all()
    with pytest.raises(ValueError, match="missing"):
        load_timm_weights(dst, _save(tmp_path / "empty.pth", {}))


def _save(path, obj):
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------------- FPN

def _fpn_inputs():
    # C5 of an odd-sized image: the top-down path must resize to the lateral's size, not x2
    return [torch.randn(2, 8, 9, 13), torch.randn(2, 16, 5, 7), torch.randn(2, 32, 3, 4)]


def test_fpn_levels_follow_the_official_definition():
    fpn = FPN([8, 16, 32], 16, drop_block_prob=0.3).eval()
    c3, c4, c5 = feats = _fpn_inputs()
    with torch.no_grad():
        p3, p4, p5, p6, p7 = fpn(feats)
        top5 = fpn.lateral[2](c5)
        top4 = fpn.lateral[1](c4) + F.interpolate(top5, size=(5, 7), mode="nearest")
        top3 = fpn.lateral[0](c3) + F.interpolate(top4, size=(9, 13), mode="nearest")
        torch.testing.assert_close(p5, fpn.output[2](top5))
        torch.testing.assert_close(p4, fpn.output[1](top4))
        torch.testing.assert_close(p3, fpn.output[0](top3))
        torch.testing.assert_close(p6, fpn.p6(p5))                  # from P5, not C5
        torch.testing.assert_close(p7, fpn.p7(F.relu(p6)))
    assert [p.shape[-2:] for p in (p3, p4, p5, p6, p7)] == [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)]


def test_fpn_dropblock_only_in_training_and_only_on_p3_p4():
    fpn = FPN([8, 16, 32], 16, drop_block_prob=0.9, drop_block_size=3)
    feats = _fpn_inputs()
    with torch.no_grad():
        fpn.eval()
        ref, again = fpn(feats), fpn(feats)
        fpn.train()
        torch.manual_seed(0)
        train = fpn(feats)
    for a, b in zip(ref, again):
        assert torch.equal(a, b)
    assert not torch.allclose(train[0], ref[0]) and not torch.allclose(train[1], ref[1])
    for level in (2, 3, 4):
        assert torch.equal(train[level], ref[level])


def test_build_backbone_glip_t_parameter_counts():
    """Spec §9: Swin-T 27.52 M, FPN 3.30 M parameters."""
    backbone = build_backbone(load_model_config("glip_t"))
    assert round(sum(p.numel() for p in backbone.body.parameters()) / 1e6, 2) == 27.52
    assert round(sum(p.numel() for p in backbone.fpn.parameters()) / 1e6, 2) == 3.30
