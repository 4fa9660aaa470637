"""A 2-D convolution that runs its weight-bound shapes on the CPU as one matrix product.

At the bottom of an SD UNet (1280 channels at 4x4 or 8x8 latents) a 3x3 convolution does little arithmetic
per weight: 2x1280x4x4 inputs against a 59 MB weight. oneDNN, which torch uses for CPU convolutions, runs
these layers at 30-90 GFLOP/s on a CPU whose fp32 matmul reaches 170 (benchmarks/roofline.py), much of it
spent converting the weight into its blocked layout on each call. Written as im2col + GEMM (the classic
lowering: Chellapilla et al. 2006, "High Performance Convolutional Neural Networks for Document
Processing"; Caffe's `im2col`), the weight is read once, in the layout it is stored in: the product
(out, in*k*k) @ (in*k*k, batch*positions) is one BLAS call whose cost is reading the weight.
benchmarks/conv_lowering.py times both per shape; the rule in `gemm_pays` depends on the shape alone
(never on timings taken at run time), so two runs of the same model make the same choices and give the
same bits.

The layer is an `nn.Conv2d` (same parameters, state-dict keys, hooks, peft LoRA wrapping); elsewhere (GPU,
other dtypes, channels-last inputs, groups, padding modes) it is exactly nn.Conv2d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The lowering pays when the weight is large and the output has few positions (batch x height x width):
# then reading the weight is the cost. Measured on a 2-core AMD EPYC (AVX-512), fp32, forward + backward
# (benchmarks/conv_lowering.py, README "Performance"): inside these bounds 0.40-1.03x oneDNN's time with
# glibc's allocator and 0.65-1.04x with `malloc: reuse` (ldm/utils/malloc.py), which removes the page
# faults of oneDNN's weight copies; at 256 positions and beyond oneDNN wins by up to 1.3x with `reuse`.
MIN_WEIGHT = 4 * 2**20  # weight elements: 640 -> 1280 3x3 and wider (SD1's two lowest levels)
MAX_POSITIONS = 128  # batch x output height x width
LOWERING = {"enabled": True}  # benchmarks/unet_step.py --no-lowering switches it off to time the difference


def set_lowering(enabled: bool) -> None:
    """Switch the lowering on or off for every `Conv2d` of the process (for benchmarks)."""
    LOWERING["enabled"] = bool(enabled)


def output_size(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    """Output height and width of `conv` on an h x w input (torch.nn.Conv2d's formula)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def gemm_pays(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv` on `x` runs as im2col + one matrix product: a CPU fp32 NCHW input, a plain
    convolution (no groups, zero padding), a weight of at least MIN_WEIGHT elements and at most
    MAX_POSITIONS output positions."""
    if not LOWERING["enabled"] or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if x.ndim != 4 or not x.is_contiguous():
        return False
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if conv.weight.numel() < MIN_WEIGHT:
        return False
    ho, wo = output_size(conv, *x.shape[-2:])
    return x.shape[0] * ho * wo <= MAX_POSITIONS


def conv2d_gemm(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv(x)` as im2col (F.unfold) and one (out, in*k*k) @ (in*k*k, batch*positions) product; the
    result is a contiguous NCHW tensor like oneDNN's."""
    b, _, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    ho, wo = output_size(conv, h, w)
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        cols = x.reshape(b, x.shape[1], h * w)
    else:
        cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    # (B, K, L) -> (K, B*L): the batch joins the columns, so the weight is read once for all images.
    cols = cols.transpose(0, 1).reshape(cols.shape[1], b * ho * wo)
    weight = conv.weight.reshape(conv.out_channels, -1)
    out = weight @ cols if conv.bias is None else torch.addmm(conv.bias[:, None], weight, cols)
    return out.view(conv.out_channels, b, ho, wo).transpose(0, 1).contiguous()


class Conv2d(nn.Conv2d):
    """nn.Conv2d that lowers weight-bound CPU shapes to one matrix product (`gemm_pays`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if gemm_pays(self, x):
            return conv2d_gemm(x, self)
        return super().forward(x)
