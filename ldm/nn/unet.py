"""The noise-prediction UNet of Stable Diffusion 1.x / 2.x.

Architecture of Rombach et al. 2022 (LDM), built on the ADM UNet of Dhariwal & Nichol 2021; the
structure and the parameter names follow CompVis/stable-diffusion `ldm/modules/diffusionmodules/
openaimodel.py` (`UNetModel`), so `state_dict()` has the keys stored under `model.diffusion_model.`
in released checkpoints. SD1 and SD2 differ only in arguments (see configs/model/unet/).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.attention import SpatialTransformer, group_norm
from ldm.nn.conv import Conv2d


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps (Vaswani et al. 2017; ADM)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedSequential(nn.Sequential):
    """A sequential block that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    """Strided 3x3 convolution halving the resolution (ADM `Downsample`, `use_conv=True`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (ADM `Upsample`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        dtype = x.dtype
        # `size` is the skip connection's size, for latents whose side is not divisible by 2**levels
        # (as diffusers' `forward_upsample_size`); otherwise exactly 2x. fp32: exact, and bf16-safe.
        if size is None:
            x = F.interpolate(x.float(), scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x.float(), size=tuple(size), mode="nearest")
        x = x.to(dtype)
        return self.conv(x)


class ResBlock(nn.Module):
    """Residual block with an additive timestep embedding (ADM `ResBlock`, no scale-shift norm as in SD)."""

    def __init__(
        self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            group_norm(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # Zero-initialized last convolution: each block starts as the identity (ADM `zero_module`).
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = (
            nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)
        )
        self.gradient_checkpointing = False

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class UNetModel(nn.Module):
    """UNet predicting eps (or v, or x0) from a noisy latent, a timestep and a cross-attention context.

    Arguments keep CompVis' names: `attention_resolutions` lists the downsampling factors (1, 2, 4, ...)
    whose levels get a SpatialTransformer; heads are given by count (`num_heads`, SD1) or by width
    (`num_head_channels`, SD2); `transformer_depth` is an int or one value per level.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_heads: int = 8,
        num_head_channels: int = -1,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = 768,
        use_linear_in_transformer: bool = False,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        upcast_attention: bool = False,
        num_classes: int | None = None,
    ):
        super().__init__()
        # The constructor arguments, so exports can rebuild this network exactly (pipeline_io, checkpoints).
        depth_arg = transformer_depth if isinstance(transformer_depth, int) else list(transformer_depth)
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
            num_res_blocks=num_res_blocks, attention_resolutions=list(attention_resolutions),
            channel_mult=list(channel_mult), num_heads=num_heads, num_head_channels=num_head_channels,
            transformer_depth=depth_arg,
            context_dim=context_dim, use_linear_in_transformer=use_linear_in_transformer, dropout=dropout,
            upcast_attention=upcast_attention, num_classes=num_classes,
        )  # fmt: skip
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set either num_heads or num_head_channels (both are -1)")
        channel_mult = list(channel_mult)
        depths = (
            [transformer_depth] * len(channel_mult)
            if isinstance(transformer_depth, int)
            else list(transformer_depth)
        )
        if len(depths) != len(channel_mult):
            raise ValueError(
                f"UNetModel: transformer_depth has {len(depths)} values for {len(channel_mult)} levels"
            )
        for mult in channel_mult:
            if (model_channels * mult) % 32:
                raise ValueError(
                    f"UNetModel: channels {model_channels * mult} are not a multiple of 32 (GroupNorm)"
                )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        attention_resolutions = set(attention_resolutions)

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            # SD1 fixes the head count, SD2 the head width (64).
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            return SpatialTransformer(
                ch,
                heads,
                ch // heads,
                depth,
                dropout,
                context_dim,
                use_linear_in_transformer,
                upcast_attention,
            )

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        # Class-conditional models add a label embedding to the timestep embedding (ADM; CompVis `label_emb`).
        self.num_classes = num_classes
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, dropout, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, dropout), transformer(ch, depths[-1]), ResBlock(ch, emb_dim, dropout)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, dropout, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), Conv2d(model_channels, out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        if use_checkpoint:
            self.set_gradient_checkpointing(True)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResBlock and transformer activations in the backward pass to save memory."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = enabled

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the network target (eps, v or x0) for latents `x` at `timesteps` given `context`."""
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional (num_classes is set): pass class labels `y`")
            emb = emb + self.label_emb(y.to(x.device))
        if context is not None:
            context = context.to(x.dtype)
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
