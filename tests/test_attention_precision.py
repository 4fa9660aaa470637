"""`upcast_attention` computes attention in fp32 even inside a bf16/fp16 autocast region, as the SD2 reference
(Stability-AI/stablediffusion `ldm/modules/attention.py`, `_ATTN_PRECISION == "fp32"` under
`torch.autocast(enabled=False)`) does; casting q, k, v up inside autocast alone is undone by autocast.

The check is on the dtype SDPA runs in: on the CPU the bf16/fp16 SDPA kernels accumulate in fp32, so the
overflow the reference guards against (fp16 logits on CUDA) does not show numerically here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.nn.attention import CrossAttention


def identity_attention(upcast: bool, dim: int = 64, heads: int = 4) -> CrossAttention:
    """Attention whose projections are the identity, so that under autocast the only rounding left apart from
    the attention itself is that of bf16 inputs and output (equal for both settings)."""
    attn = CrossAttention(dim, dim, heads=heads, dim_head=dim // heads, upcast=upcast)
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            lin.weight.copy_(torch.eye(dim))
        attn.to_out[0].bias.zero_()
    return attn


def test_upcast_attention_is_fp32_under_autocast(monkeypatch):
    """The SDPA call of an upcast attention returns fp32 under bf16 autocast (autocast is off around it),
    and the module still returns the autocast dtype to the layers after it."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    x = torch.randn(2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        up = identity_attention(upcast=True)(x)
        plain = identity_attention(upcast=False)(x)
    assert seen == [torch.float32, torch.bfloat16]
    assert up.dtype == plain.dtype == torch.bfloat16


def test_upcast_attention_on_the_meta_device():
    """No autocast exists on the meta device (used to count full-size parameters): upcast still runs there."""
    with torch.device("meta"):
        attn = CrossAttention(64, heads=4, dim_head=16, upcast=True)
        out = attn(torch.empty(1, 8, 64))
    assert out.shape == (1, 8, 64) and out.device.type == "meta"
