import pytest
import torch
import torch.nn.functional as F

from model.fusion import VLFuse

V, L, E, H = 16, 24, 32, 4
SIZES = [(4, 6), (2, 3), (1, 2)]


def make_inputs(batch=2, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    visual = [torch.randn(batch, V, h, w, generator=g) for h, w in SIZES]
    text = torch.randn(batch, tokens, L, generator=g)
    mask = torch.ones(batch, tokens)
    mask[1, 4:] = 0
    return visual, text, mask


def make_fuse(seed=0, gamma=0.25):
    torch.manual_seed(seed)
    fuse = VLFuse(V, L, E, H, dropout=0.1, init_gamma=gamma).eval()
    with torch.no_grad():   # non-trivial LayerNorms and biases
        for p in fuse.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        fuse.gamma_v.fill_(gamma)
        fuse.gamma_l.fill_(gamma)
    return fuse


def reference(fuse, visual, text, mask):
    """Spec §4.2 written out with einsum over one concatenated visual sequence."""
    a = fuse.attn
    b = text.shape[0]
    v = torch.cat([x.flatten(2).transpose(1, 2) for x in visual], dim=1)
    v = F.layer_norm(v, (V,), fuse.layer_norm_v.weight, fuse.layer_norm_v.bias)
    l = F.layer_norm(text, (L,), fuse.layer_norm_l.weight, fuse.layer_norm_l.bias)
    split = lambda x: x.view(b, x.shape[1], H, E // H)                   # [B, S, h, d]
    q = split(F.linear(v, a.v_proj.weight, a.v_proj.bias) * (E // H) ** -0.5)
    k = split(F.linear(l, a.l_proj.weight, a.l_proj.bias))
    vv = split(F.linear(v, a.values_v_proj.weight, a.values_v_proj.bias))
    vl = split(F.linear(l, a.values_l_proj.weight, a.values_l_proj.bias))
    s = torch.einsum("bnhd,bthd->bhnt", q, k).clamp(-50000, 50000)
    st = s.transpose(-1, -2)
    p_l = (st - st.amax(-1, keepdim=True)).clamp(-50000, 50000).softmax(-1)   # over ALL positions
    p_v = (s + torch.where(mask[:, None, None, :] == 0, -9e15, 1.0)).softmax(-1)   # official +mask
    dv = F.linear(torch.einsum("bhnt,bthd->bnhd", p_v, vl).reshape(b, -1, E), a.out_v_proj.weight, a.out_v_proj.bias)
    dl = F.linear(torch.einsum("bhtn,bnhd->bthd", p_l, vv).reshape(b, -1, E), a.out_l_proj.weight, a.out_l_proj.bias)
    v = v + fuse.gamma_v * dv
    l = l + fuse.gamma_l * dl
    out, start = [], 0
    for h, w in SIZES:
        out.append(v[:, start:start + h * w].transpose(1, 2).reshape(b, V, h, w))
        start += h * w
    return out, l


def test_matches_the_spec_written_out():
    fuse = make_fuse()
    visual, text, mask = make_inputs()
    out_v, out_l = fuse(visual, text, mask)
    ref_v, ref_l = reference(fuse, visual, text, mask)
    for a, b in zip(out_v, ref_v):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(out_l, ref_l, atol=1e-5)


def test_levels_form_one_sequence_for_the_text_side():
    """The text's softmax runs over all levels at once: fusing levels one at a time differs."""
    fuse = make_fuse()
    visual, text, mask = make_inputs()
    _, joint = fuse(visual, text, mask)
    _, alone = fuse(visual[:1], text, mask)
    assert not torch.allclose(joint, alone, atol=1e-4)


def test_residual_is_added_to_the_layer_normed_input():
    fuse = make_fuse(gamma=0.0)
    visual, text, mask = make_inputs()
    out_v, out_l = fuse(visual, text, mask)
    assert torch.allclose(out_l, fuse.layer_norm_l(text), atol=1e-6)
    ln_v = fuse.layer_norm_v(visual[0].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(out_v[0], ln_v, atol=1e-6)


def test_padded_tokens_do_not_leak():
    fuse = make_fuse()
    visual, text, mask = make_inputs()
    out_v, out_l = fuse(visual, text, mask)
    text2 = text.clone()
    text2[1, 4:] = 100 * torch.randn_like(text2[1, 4:])
    out_v2, out_l2 = fuse(visual, text2, mask)
    for a, b in zip(out_v, out_v2):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(out_l[:, :4], out_l2[:, :4], atol=1e-6)
    assert torch.allclose(out_l[0], out_l2[0], atol=1e-6)


def test_init_and_parameter_names():
    fuse = VLFuse(V, L, E, H, dropout=0.1, init_gamma=1 / 6)
    names = set(fuse.state_dict())
    expected = {"gamma_v", "gamma_l"} | {f"layer_norm_{m}.{p}" for m in "vl" for p in ("weight", "bias")} | {
        f"attn.{n}.{p}" for n in ("v_proj", "l_proj", "values_v_proj", "values_l_proj", "out_v_proj", "out_l_proj")
        for p in ("weight", "bias")}
    assert names == expected
    assert torch.all(fuse.gamma_v == 1 / 6) and torch.all(fuse.gamma_l == 1 / 6)
    assert all(torch.all(getattr(fuse.attn, n).bias == 0) for n in ("v_proj", "out_l_proj"))
    bound = (6 / (V + E)) ** 0.5                                            # xavier-uniform
    assert fuse.attn.v_proj.weight.abs().max() <= bound


def test_dropout_only_in_training():
    fuse = make_fuse()
    visual, text, mask = make_inputs()
    a = fuse(visual, text, mask)[1]
    assert torch.equal(a, fuse(visual, text, mask)[1])
    fuse.train()
    torch.manual_seed(1)
    b = fuse(visual, text, mask)[1]
    torch.manual_seed(2)
    c = fuse(visual, text, mask)[1]
    assert not torch.allclose(b, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_stays_finite(dtype):
    fuse = make_fuse()
    visual, text, mask = make_inputs()
    visual, text = [10 * x for x in visual], 10 * text
    with torch.autocast("cpu", dtype=dtype):
        out_v, out_l = fuse(visual, text, mask)
    assert all(torch.isfinite(x).all() for x in out_v) and torch.isfinite(out_l).all()
    ref_v, ref_l = fuse(visual, text, mask)
    assert (out_l[:, :4].float() - ref_l[:, :4]).abs().max() < 0.5
    assert (out_v[0].float() - ref_v[0]).abs().max() < 0.5
