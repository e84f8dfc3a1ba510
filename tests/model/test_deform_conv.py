"""The grid-sample DCNv2 computes torchvision's deform_conv2d: values and every gradient."""
import pytest
import torch
from torchvision.ops import deform_conv2d

from model.deform_conv import modulated_deform_conv2d, modulated_deform_conv2d_sampled


def _inputs(b, c_in, c_out, h, w, stride, offset_scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = torch.randn(b, c_in, h, w, generator=g, dtype=torch.float64)
    offset = torch.randn(b, 18, out_h, out_w, generator=g, dtype=torch.float64) * offset_scale
    mask = torch.rand(b, 9, out_h, out_w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, offset, mask, weight, bias)]


@pytest.mark.parametrize("b,c_in,c_out,h,w,stride,offset_scale", [
    (2, 5, 7, 9, 11, 1, 1.5),
    (2, 5, 7, 9, 11, 2, 1.5),
    (1, 3, 4, 1, 6, 1, 0.7),       # a one-row level (P7 of a small image)
    (1, 3, 4, 2, 2, 2, 0.7),
    (3, 4, 4, 6, 5, 1, 6.0),       # most taps fall outside: zero padding
])
def test_values_and_gradients_equal_torchvision(b, c_in, c_out, h, w, stride, offset_scale):
    x, offset, mask, weight, bias = _inputs(b, c_in, c_out, h, w, stride, offset_scale)
    ref = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    ours = modulated_deform_conv2d_sampled(x, offset, mask, weight, bias, stride=stride, padding=1)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    upstream = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * upstream).sum(), (x, offset, mask, weight, bias))
    g_ours = torch.autograd.grad((ours * upstream).sum(), (x, offset, mask, weight, bias))
    for name, a, r in zip(("x", "offset", "mask", "weight", "bias"), g_ours, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-8, msg=f"gradient of {name}")


def test_integer_offsets_shift_a_plain_convolution():
    x, _, _, weight, bias = _inputs(1, 2, 3, 8, 8, 1, 0.0)
    offset = torch.zeros(1, 18, 8, 8, dtype=torch.float64)
    offset[:, 1::2] = 1.0                                     # every tap one pixel to the right
    mask = torch.ones(1, 9, 8, 8, dtype=torch.float64)
    # tap kx of output column j reads column j + kx (zero past the right edge)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 2, 1, 1)), weight, bias)
    torch.testing.assert_close(modulated_deform_conv2d(x, offset, mask, weight, bias), expected)


def test_float32_and_batched_equal_per_image():
    x, offset, mask, weight, bias = (t.detach().float() for t in _inputs(3, 4, 6, 7, 9, 1, 2.0))
    batched = modulated_deform_conv2d(x, offset, mask, weight, bias)
    singles = torch.cat([modulated_deform_conv2d(x[i:i + 1], offset[i:i + 1], mask[i:i + 1], weight, bias)
                         for i in range(3)])
    torch.testing.assert_close(batched, singles)
    ref = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    torch.testing.assert_close(batched, ref, rtol=1e-5, atol=1e-5)


def test_channel_mismatch_is_named():
    x, offset, mask, weight, bias = _inputs(1, 4, 4, 5, 5, 1, 1.0)
    with pytest.raises(ValueError, match="input channels"):
        modulated_deform_conv2d(x[:, :3], offset, mask, weight, bias)
    with pytest.raises(ValueError, match="offset has 16 channels"):
        modulated_deform_conv2d(x, offset[:, :16], mask, weight, bias)
