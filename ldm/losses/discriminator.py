"""PatchGAN discriminator (Isola et al. 2017, pix2pix, Sec. 3.2.2), as the autoencoder's adversary
(Esser et al. 2021, Sec. 3.2; taming `taming/modules/discriminator/model.py` `NLayerDiscriminator`).

Layer indices in `main` are taming's, so `loss.discriminator.main.*` weights of a CompVis/taming
checkpoint load into the batch-norm variant as they are. The other norms put an `nn.Identity` where the
batch norm would be, keeping the indices.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

NORMS = ("batch", "spectral", "none")


def weights_init(m: nn.Module) -> None:
    """taming's `weights_init` (DCGAN, Radford et al. 2016): conv weights N(0, 0.02), BN scales N(1, 0.02)."""
    if isinstance(m, nn.Conv2d):
        # Before spectral_norm wraps the weight; conv biases keep PyTorch's default init, as in taming.
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """Fully convolutional patch classifier: image (B, C, H, W) -> real/fake logits (B, 1, H', W').

    `n_layers` stride-2 4x4 convs (channels ndf * min(2**n, 8)), one stride-1 conv, a 1-channel output
    conv; with n_layers=3 each logit sees a 70x70 patch, and a 256 px image gives 30x30 logits.
    norm: "batch" (taming), "spectral" (Miyato et al. 2018, on every conv, no batch statistics) or "none".
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"NLayerDiscriminator: norm must be one of {NORMS}, got {norm!r}")
        # A bias before batch norm is cancelled by its mean subtraction (taming's `use_bias`).
        bias = norm != "batch"

        def conv(c_in: int, c_out: int, stride: int, with_bias: bool = bias) -> nn.Module:
            layer = nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=with_bias)
            weights_init(layer)
            return spectral_norm(layer) if norm == "spectral" else layer

        def norm_layer(channels: int) -> nn.Module:
            if norm != "batch":
                return nn.Identity()
            bn = nn.BatchNorm2d(channels)
            weights_init(bn)
            return bn

        layers: list[nn.Module] = [conv(in_channels, ndf, 2, with_bias=True), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers += [conv(ndf * prev, ndf * mult, stride), norm_layer(ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(conv(ndf * mult, 1, 1, with_bias=True))
        self.main = nn.Sequential(*layers)
        self.config = dict(in_channels=in_channels, ndf=ndf, n_layers=n_layers, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
