import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from model.dyconv import DyConv, DyReLU, ModulatedDeformConv3x3, upper_level_offset

C, GROUPS = 16, 4
SIZES = [(8, 10), (4, 5), (2, 3)]


def make_features(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, C, h, w, generator=g) for h, w in SIZES]


def make_dyconv(seed=0):
    torch.manual_seed(seed)
    m = DyConv(C, GROUPS).eval()
    with torch.no_grad():   # offsets of a few pixels, non-trivial attention and norms
        m.offset.weight.mul_(3.0)
        m.scale_attn[1].weight.normal_(0, 0.3)
        for conv in m.convs:
            conv.conv.bias.normal_(0, 0.1)
            conv.norm.weight.normal_(1, 0.2)
    return m


def test_upper_level_offset_reads_the_memory_of_each_image():
    g = torch.Generator().manual_seed(0)
    offset_mask = torch.randn(2, 27, 4, 5, generator=g)
    offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()   # a non-contiguous slice
    new_offset, new_mask = upper_level_offset(offset, mask, (2, 3))
    assert new_offset.shape == (2, 18, 2, 3) and new_mask.shape == (2, 9, 2, 3)
    h, w, H, W = 2, 3, 4, 5
    for b in range(2):
        for c in range(18):
            for y in range(h):
                for x in range(w):
                    flat = c * h * w + y * w + x                  # position in offset[b]'s memory
                    src = offset_mask[b, flat // (H * W), (flat // W) % H, flat % W]
                    assert new_offset[b, c, y, x] == src
        for c in range(9):
            flat = torch.arange(c * h * w, (c + 1) * h * w)
            assert torch.equal(new_mask[b, c].flatten(), mask[b].flatten()[flat])
    # not a crop of the top-left corner
    assert not torch.equal(new_offset, offset[:, :, :h, :w])
    # same size: unchanged
    same = upper_level_offset(offset, mask, (4, 5))
    assert same[0] is offset and same[1] is mask


def reference_dyconv(m, feats):
    """Spec §4.4 written out; the upper branch's offsets are sliced by hand per image."""
    outs = []
    for level, x in enumerate(feats):
        b = x.shape[0]
        om = F.conv2d(x, m.offset.weight, m.offset.bias, padding=1)
        off, msk = om[:, :18], om[:, 18:].sigmoid()

        def branch(k, inp, stride):
            h, w = (inp.shape[2] - 1) // stride + 1, (inp.shape[3] - 1) // stride + 1
            o = torch.stack([off[i].reshape(-1)[:18 * h * w].view(18, h, w) for i in range(b)])
            mm = torch.stack([msk[i].reshape(-1)[:9 * h * w].view(9, h, w) for i in range(b)])
            conv = m.convs[k]
            y = deform_conv2d(inp, o, conv.conv.weight, conv.conv.bias, stride=stride, padding=1, mask=mm)
            return F.group_norm(y, GROUPS, conv.norm.weight, conv.norm.bias)

        fs = [branch(1, x, 1)]
        if level > 0:
            fs.append(branch(2, feats[level - 1], 2))
        if level < len(feats) - 1:
            fs.append(F.interpolate(branch(0, feats[level + 1], 1), size=x.shape[-2:],
                                    mode="bilinear", align_corners=True))
        att = [F.relu6(F.relu(F.conv2d(f.mean((2, 3), keepdim=True), m.scale_attn[1].weight,
                                       m.scale_attn[1].bias)) + 3) / 6 for f in fs]
        outs.append(sum(f * a for f, a in zip(fs, att)) / len(fs))
    return [m.dyrelu(o) for o in outs]


def test_dyconv_matches_the_spec_written_out():
    m = make_dyconv()
    feats = make_features()
    out = m(feats)
    ref = reference_dyconv(m, feats)
    for o, r, (h, w) in zip(out, ref, SIZES):
        assert o.shape == (2, C, h, w)
        assert torch.allclose(o, r, atol=1e-5)


def test_dyconv_batched_equals_per_item():
    m = make_dyconv()
    feats = make_features()
    out = m(feats)
    for i in range(2):
        single = m([f[i:i + 1] for f in feats])
        for a, b in zip(out, single):
            assert torch.allclose(a[i:i + 1], b, atol=1e-5)


def test_zero_offsets_and_full_mask_is_a_plain_conv():
    conv = ModulatedDeformConv3x3(C, 8, stride=2)
    x = torch.randn(1, C, 7, 9)
    h, w = conv.output_size(7, 9)
    out = conv(x, torch.zeros(1, 18, h, w), torch.ones(1, 9, h, w))
    assert torch.allclose(out, F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1), atol=1e-5)
    bound = 1 / (C * 9) ** 0.5                                             # official reset_parameters
    assert conv.weight.abs().max() <= bound and torch.all(conv.bias == 0)


def test_dyrelu_with_neutral_coefficients_is_relu():
    d = DyReLU(C)
    with torch.no_grad():
        d.fc[2].weight.zero_()
        d.fc[2].bias.zero_()                                               # h_sigmoid(0) = 0.5
    x = torch.randn(2, C, 3, 4)
    assert torch.allclose(d(x), F.relu(x))


def test_parameter_names_and_init():
    m = DyConv(C, GROUPS)
    names = set(m.state_dict())
    expected = ({f"convs.{k}.{part}.{p}" for k in range(3) for part in ("conv", "norm") for p in ("weight", "bias")}
                | {"scale_attn.1.weight", "scale_attn.1.bias", "offset.weight", "offset.bias"}
                | {f"dyrelu.fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")})
    assert names == expected
    assert m.offset.weight.shape == (27, C, 3, 3) and m.dyrelu.fc[2].weight.shape == (4 * C, C // 4)
    assert m.offset.weight.abs().sum() > 0                                  # PyTorch default, not zeroed
    assert torch.all(m.scale_attn[1].bias == 0) and m.scale_attn[1].weight.std() < 0.05


def test_runs_under_autocast_and_backward():
    m = make_dyconv().train()
    feats = [f.requires_grad_() for f in make_features()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(feats)
    loss = sum(o.float().sum() for o in out)
    loss.backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)
    assert m.offset.weight.grad is not None and m.convs[0].conv.weight.grad.abs().sum() > 0
