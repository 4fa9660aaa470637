"""The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1 and App. G).

Structure and parameter names follow CompVis/latent-diffusion `ldm/modules/diffusionmodules/model.py`
(`Encoder`, `Decoder`) and `ldm/models/autoencoder.py` (`AutoencoderKL`), so `state_dict()` has the keys
stored under `first_stage_model.` in released Stable Diffusion checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 - the reference's name
    """GroupNorm(32, eps=1e-6), the autoencoder's normalization (CompVis `Normalize`)."""
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without timestep input (CompVis `ResnetBlock`, temb_channels=0)."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv projections (CompVis `AttnBlock`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head whose width is the channel count.
        q, k, v = (p(y).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution with asymmetric (0, 1, 0, 1) zero padding (CompVis `Downsample`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling and a 3x3 convolution (CompVis `Upsample`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(dtype))


def _mid(channels: int, dropout: float) -> nn.Module:
    """The bottleneck: ResnetBlock, attention, ResnetBlock (the only attention in SD's autoencoder)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    """Image -> moments (mean and log-variance when `double_z`) at 1 / 2**(len(ch_mult)-1) resolution."""

    def __init__(
        self,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        in_channels: int = 3,
        resolution: int = 256,
        z_channels: int = 4,
        double_z: bool = True,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for level in range(self.num_resolutions):
            block_in, block_out = ch * in_mult[level], ch * ch_mult[level]
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                res //= 2
            self.down.append(down)
        self.mid = _mid(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn):
                    h = down.attn[i](h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image; each level has `num_res_blocks + 1` ResnetBlocks, as the reference."""

    def __init__(
        self,
        ch: int = 128,
        out_ch: int = 3,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resolution: int = 256,
        z_channels: int = 4,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout)
        ups: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            ups.insert(0, up)  # stored by level, so `up.0` is the full-resolution level as in the reference
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """The last conv weight, where the GAN adaptive weight takes its gradients (Esser et al. 2021)."""
        return self.conv_out.weight


class DiagonalGaussianDistribution:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))) (Kingma & Welling 2014; CompVis)."""

    def __init__(self, moments: torch.Tensor, deterministic: bool = False):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamp as the reference: keeps exp() finite for an untrained encoder.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean)
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized sample mean + std * noise."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The posterior mean, the latent used when encoding deterministically."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `x` under the posterior, per sample."""
        if self.deterministic:
            return torch.zeros(x.shape[0], device=x.device)
        log_2pi = 1.8378770664093453
        return 0.5 * (log_2pi + self.logvar + (x - self.mean).pow(2) / self.var).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder, decoder and the 1x1 quantization convs; `scale_factor` brings latents to unit variance.

    The scale factor is not a weight of the released checkpoints (SD1/2 use 0.18215): it travels with the
    export of a trained autoencoder (1 / std of its latents) so stage two need not hard-code it.
    """

    def __init__(
        self,
        embed_dim: int = 4,
        z_channels: int = 4,
        double_z: bool = True,
        in_channels: int = 3,
        out_ch: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        dropout: float = 0.0,
        scale_factor: float = 0.18215,
    ):
        super().__init__()
        # The constructor arguments, so exports can rebuild this network exactly (pipeline_io, checkpoints).
        self.config = dict(
            embed_dim=embed_dim, z_channels=z_channels, double_z=double_z, in_channels=in_channels,
            out_ch=out_ch, ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
            attn_resolutions=list(attn_resolutions),
            resolution=resolution, dropout=dropout, scale_factor=float(scale_factor),
        )  # fmt: skip
        if not double_z:
            raise ValueError(
                "AutoencoderKL: double_z must be true (the encoder predicts mean and log-variance)"
            )
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        self.encoder = Encoder(
            ch,
            ch_mult,
            num_res_blocks,
            attn_resolutions,
            dropout,
            in_channels,
            resolution,
            z_channels,
            double_z,
        )
        self.decoder = Decoder(
            ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution, z_channels
        )
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.scale_factor = float(scale_factor)
        self.downsampling_factor = 2 ** (len(ch_mult) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image in [-1, 1] -> posterior over (unscaled) latents."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(Unscaled) latent -> image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ):
        """Reconstruct `x`; returns (reconstruction, posterior) as the reference's training step expects."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
