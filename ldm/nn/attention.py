"""Attention layers of the Stable Diffusion UNet, on `F.scaled_dot_product_attention`.

Module and parameter names follow CompVis/stable-diffusion `ldm/modules/attention.py`, so that the
state dict of a `SpatialTransformer` is the one stored in released checkpoints
(`proj_in`, `transformer_blocks.N.attn1.to_q`, `ff.net.0.proj`, ...).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with 32 groups, the normalization used throughout SD (`normalization()` in CompVis)."""
    return GroupNorm32(32, channels, eps=eps)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (CompVis `GroupNorm32`): fp16 statistics overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            w = self.weight.float() if self.weight is not None else None
            b = self.bias.float() if self.bias is not None else None
            return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
        return super().forward(x)


class CrossAttention(nn.Module):
    """Multi-head attention of queries from `x` over keys/values from `context` (self-attention when None).

    Vaswani et al. 2017; SD's `CrossAttention`. `upcast` computes the attention in fp32, as SD2.1 needs
    in half precision (its attention logits overflow fp16), with autocast disabled around it as
    Stability-AI/stablediffusion `ldm/modules/attention.py` does (`_ATTN_PRECISION == "fp32"`), and returns
    the result in the projections' dtype.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        upcast: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, _ = q.shape
        # (B, N, H*D) -> (B, H, N, D), the layout SDPA's fused kernels expect.
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        if self.upcast:
            out = _fp32_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _fp32_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA computed in float32, returned in q's dtype. Inside an autocast region casting q, k, v up is not
    enough: autocast casts SDPA's inputs back down to the half dtype, so it is switched off here (the
    reference wraps its fp32 attention in `torch.autocast(enabled=False)` for the same reason)."""
    device_type = q.device.type
    # Devices without autocast (meta, used to count parameters) have nothing to switch off.
    off = (
        torch.autocast(device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()
    )
    with off:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return out.to(q.dtype)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with GEGLU input, width `mult * dim` (SD's `FeedForward(glu=True)`)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the context, GEGLU MLP (LDM, Rombach et al.)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        upcast_attention: bool = False,
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout, upcast_attention)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout, upcast_attention)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.gradient_checkpointing = False

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute activations in backward: trades ~30% more compute for much less memory.
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned by cross-attention (LDM Sec. 3.3).

    `use_linear` selects SD2's linear `proj_in`/`proj_out` instead of SD1's 1x1 convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = group_norm(in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, dropout, context_dim, upcast_attention)
            for _ in range(depth)
        )
        # Zero-initialized output projection: the block starts as the identity (CompVis `zero_module`).
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if not (_plain(self.proj_in) and _plain(self.proj_out)):
            return self._forward_through_modules(x, context)
        x_in = x
        b = x.shape[0]
        # (B, C, H, W) -> (B, HW, C) as a view, one token per pixel: no copy in either memory format.
        tokens = self.norm(x).flatten(2).mT
        # proj_in as a batched matrix product on the token view (a 1x1 convolution is one): BLAS reads the
        # transposed view in place and writes (B, HW, inner) contiguous, the layout LayerNorm and the
        # attention projections want. A 1x1 convolution followed by permute/reshape (the reference) copies
        # every feature map once on the way in and once on the way out of each block; F.linear/matmul on
        # the view copies too (matmul folds a non-contiguous input into a matrix when the weight needs a
        # gradient), bmm does not.
        x = _add_bias(torch.bmm(tokens, _matrix(self.proj_in.weight).mT.expand(b, -1, -1)), self.proj_in.bias)
        for block in self.transformer_blocks:
            x = block(x, context)
        w_out = _matrix(self.proj_out.weight)
        if x_in.is_contiguous() or not x_in.is_contiguous(memory_format=torch.channels_last):
            # Channels-first: W @ tokens^T writes (B, C, HW) contiguous, so the output, its gradient and
            # proj_out's weight gradient keep the standard strides (DDP's gradient buckets copy
            # mismatched strides every step: torch/csrc/distributed/c10d/reducer.cpp).
            out = _add_bias(torch.bmm(w_out.expand(b, -1, -1), x.mT), self.proj_out.bias, dim=1)
        else:
            # Channels-last input: a contiguous (B, HW, C) is its (B, C, H, W) view already.
            out = _add_bias(torch.bmm(x, w_out.mT.expand(b, -1, -1)), self.proj_out.bias).mT
        return out.unflatten(2, x_in.shape[2:]) + x_in

    def _forward_through_modules(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """The reference layout, calling proj_in / proj_out as modules: for projections wrapped by LoRA
        (peft), hooks or quantization, whose forward is more than their weight (the product above reads
        the weight directly)."""
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        # contiguous(): keeps proj_out's weight gradient in standard strides (DDP's gradient buckets).
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def _plain(module: nn.Module) -> bool:
    """A bare nn.Linear / nn.Conv2d without hooks: its forward is exactly its weight and bias."""
    return type(module) in (nn.Linear, nn.Conv2d) and not (module._forward_hooks or module._forward_pre_hooks)


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight, or a 1x1 Conv2d weight (out, in, 1, 1) viewed as the (out, in) matrix it is."""
    return weight.flatten(1) if weight.ndim == 4 else weight


def _add_bias(x: torch.Tensor, bias: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """`x` plus `bias` along `dim`, in place on the fresh product (bmm does not keep its output)."""
    if bias is None:
        return x
    return x.add_(bias[:, None] if dim == 1 else bias)
