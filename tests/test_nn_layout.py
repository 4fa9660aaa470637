"""Memory layouts through the UNet: no copies between layers, channels-last kept, same numbers either way.

The reference layout (1x1 conv, permute + reshape, `.contiguous()` around every transformer) copies each
feature map twice per SpatialTransformer in the forward pass; ours feeds BLAS the transposed token views
instead (ldm/nn/attention.py). The profiler counts the copies.
"""

from collections import Counter

import pytest
import torch
from torch.profiler import profile

from ldm.nn.attention import SpatialTransformer
from ldm.nn.unet import UNetModel
from tests.tiny import UNET_KW, randomize_, rel_err

FORMATS = {"channels_first": torch.contiguous_format, "channels_last": torch.channels_last}


def copies(fn) -> Counter:
    """aten::copy_ calls during fn, by the op that made them."""
    with profile() as prof:
        fn()
    made = [e for e in prof.events() if e.name == "aten::copy_"]
    return Counter(e.cpu_parent.name if e.cpu_parent else None for e in made)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_spatial_transformer_forward_makes_no_layout_copies(fmt):
    st = randomize_(SpatialTransformer(64, 4, 16, context_dim=32)).to(memory_format=FORMATS[fmt])
    x = torch.randn(2, 64, 8, 8).to(memory_format=FORMATS[fmt])
    ctx = torch.randn(2, 7, 32)
    with torch.no_grad():
        made = copies(lambda: st(x, ctx))
    # Only nn.Linear's bias broadcast into addmm's output (attn1/attn2 to_out, GEGLU, ff output): no
    # layout change.
    assert made == {"aten::addmm": 4}, made


def test_spatial_transformer_channels_last_backward_makes_no_copies():
    st = randomize_(SpatialTransformer(64, 4, 16, context_dim=32)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    y = st(x, torch.randn(2, 7, 32))
    g = torch.randn_like(y)
    made = copies(lambda: y.backward(g))
    assert not {k for k in made if k in ("aten::clone", "aten::contiguous", "aten::reshape")}, made


def test_unet_channels_last_matches_channels_first():
    unet = randomize_(UNetModel(**UNET_KW))
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([3, 917])
    ctx = torch.randn(2, 7, 32)
    a = unet(x, t, ctx)
    a.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters()}
    unet.zero_grad()
    unet.to(memory_format=torch.channels_last)
    b = unet(x.to(memory_format=torch.channels_last), t, ctx)
    b.square().mean().backward()
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(b, a) < 1e-5
    flat = torch.cat([p.grad.flatten() for p in unet.parameters()])
    assert rel_err(flat, torch.cat([g.flatten() for g in grads.values()])) < 1e-5
    for n, p in unet.named_parameters():
        assert p.grad.stride() == p.stride(), n  # DDP buckets copy gradients whose strides differ
