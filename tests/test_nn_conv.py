"""ldm/nn/conv.py: the im2col + GEMM lowering of weight-bound CPU convolutions computes what nn.Conv2d does
(forward and every gradient), and the rule that picks it depends on the shape alone."""

import pytest
import torch
from torch import nn

from ldm.nn.conv import Conv2d, conv2d_gemm, gemm_pays, set_lowering
from tests.tiny import rel_err


@pytest.mark.parametrize(
    "cin, cout, kernel, stride, padding, bias, side, batch",
    [
        (8, 16, 3, 1, 1, True, 5, 2),  # odd side
        (8, 8, 3, 2, 1, True, 8, 3),  # SD's Downsample: stride 2
        (16, 8, 1, 1, 0, True, 4, 2),  # ResBlock skip: 1x1
        (4, 6, 3, 1, 0, False, 6, 1),  # no padding, no bias
    ],
)
def test_lowering_matches_conv2d_forward_and_gradients(cin, cout, kernel, stride, padding, bias, side, batch):
    torch.manual_seed(0)
    conv = Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias).double()
    x = torch.randn(batch, cin, side, side, dtype=torch.float64, requires_grad=True)
    ours = conv2d_gemm(x, conv)
    ref = nn.Conv2d.forward(conv, x)
    assert ours.shape == ref.shape and ours.is_contiguous()
    assert rel_err(ours, ref) < 1e-12
    g = torch.randn_like(ref)
    wrt = [x, conv.weight] + ([conv.bias] if bias else [])
    for a, b in zip(torch.autograd.grad(ours, wrt, g), torch.autograd.grad(ref, wrt, g), strict=True):
        assert rel_err(a, b) < 1e-12


def test_rule_picks_sd_bottom_layers_only():
    """SD1.5 at 2x4x32x32 latents: the 1280-channel 3x3 convolutions at 4x4 and 8x8 are lowered; the
    320-channel ones at 32x32 and anything of a tiny model stay on oneDNN."""
    with torch.device("meta"):
        big = Conv2d(1280, 1280, 3, padding=1)
        wide_in = Conv2d(2560, 1280, 3, padding=1)
        top = Conv2d(320, 320, 3, padding=1)
        small = Conv2d(64, 64, 3, padding=1)
    cpu = {"device": "cpu"}
    assert gemm_pays(big, torch.empty(2, 1280, 4, 4, **cpu))
    assert gemm_pays(big, torch.empty(2, 1280, 8, 8, **cpu))
    assert gemm_pays(wide_in, torch.empty(2, 2560, 4, 4, **cpu))
    assert not gemm_pays(big, torch.empty(4, 1280, 8, 8, **cpu))  # 256 output positions: oneDNN's
    assert not gemm_pays(top, torch.empty(2, 320, 32, 32, **cpu))
    assert not gemm_pays(small, torch.empty(2, 64, 4, 4, **cpu))


def test_rule_leaves_other_inputs_to_torch():
    conv = Conv2d(1280, 1280, 3, padding=1)
    x = torch.randn(1, 1280, 4, 4)
    assert gemm_pays(conv, x)
    assert not gemm_pays(conv, x.to(torch.bfloat16))  # only fp32 was measured
    assert not gemm_pays(conv, x.contiguous(memory_format=torch.channels_last))
    set_lowering(False)
    try:
        assert not gemm_pays(conv, x)
        assert torch.equal(conv(x), nn.Conv2d.forward(conv, x))
    finally:
        set_lowering(True)
    assert rel_err(conv(x), nn.Conv2d.forward(conv, x)) < 1e-5
