"""LPIPS perceptual distance with the VGG16 trunk (Zhang et al. 2018, "The Unreasonable Effectiveness of
Deep Features as a Perceptual Metric", eq. 1), the perceptual term of the autoencoder loss (Esser et al.
2021, Sec. 3; CompVis `ldm/modules/losses/contperceptual.py` via taming `lpips.py`).

d(x, y) = sum_l mean_hw sum_c w_lc (u_l(x) - u_l(y))_c^2, with u_l = f_l / |f_l| over channels, f_l the VGG16
activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the shifted and scaled input and w_l >= 0 the
learned per-channel weights ("lin" layers, richzhang/PerceptualSimilarity v0.1).

Weights, with nothing downloaded and no torchvision import: the trunk is built here with the index layout
of torchvision's `vgg16().features`, so torchvision's ImageNet file (`features.N.weight`) loads as it is;
the linear weights are the `vgg.pth` that torchmetrics ships inside its package.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from torch import nn

# torchvision's VGG16 configuration "D" (Simonyan & Zisserman 2015, Table 1), up to relu5_3; "M" = max pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the LPIPS taps).
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# The LPIPS ScalingLayer: images in [-1, 1] -> ImageNet-normalized inputs (richzhang `lpips.py`).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def vgg16_features() -> nn.Sequential:
    """VGG16 conv trunk through relu5_3 with torchvision's `features` indices (conv at 0, 2, 5, 7, ...)."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            # Not in place (torchvision's are): the taps are kept for the distance while the trunk runs on.
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU()]
            channels = v
    return nn.Sequential(*layers)


def torchmetrics_lpips_weights() -> Path:
    """The LPIPS v0.1 VGG linear weights shipped inside the torchmetrics package."""
    return Path(str(resources.files("torchmetrics.functional.image") / "lpips_models" / "vgg.pth"))


def _load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict of tensors from .safetensors or a weights-only torch file (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj)


def _normalize(feat: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Unit length over channels. sqrt(eps + |f|^2) as torchmetrics (richzhang PR #114) rather than the
    original |f| + 1e-10: the gradient stays finite where a ReLU zeroes a whole feature vector."""
    return feat / torch.sqrt(eps + feat.pow(2).sum(dim=1, keepdim=True))


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance between images in [-1, 1]; `forward(x, y)` -> (B,) distances.

    pretrained=True loads the trunk from `vgg16_path` (torchvision's ImageNet VGG16 file, e.g.
    vgg16-397923af.pth, or a features-only state dict) and the linear weights from `linear_path`
    (default: the file torchmetrics ships). pretrained=False builds random weights, for tests only.
    """

    def __init__(
        self,
        pretrained: bool = True,
        vgg16_path: str | os.PathLike | None = None,
        linear_path: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        if pretrained:
            if vgg16_path is None:
                raise ValueError(
                    "LPIPS(pretrained=True) needs ImageNet VGG16 weights in torchvision's format and nothing "
                    f"is downloaded at run time: fetch {VGG16_URL} once (or save torchvision's "
                    "`vgg16(weights='IMAGENET1K_V1').state_dict()`) and pass vgg16_path=/path/to/it (the "
                    "autoencoder configs read the LDM_VGG16 environment variable). pretrained=False gives "
                    "random weights, which are only good for tests."
                )
            self.load_vgg16(vgg16_path)
            self.load_linear(linear_path or torchmetrics_lpips_weights())
        else:
            self._random_init()
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def _random_init(self) -> None:
        """torchvision's VGG init (Kaiming normal, fan_out), so random features neither vanish nor explode;
        non-negative linear weights, as LPIPS keeps them by clamping."""
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for lin in self.lins:
            lin.weight.uniform_(0.0, 2.0 / lin.weight.shape[1])

    def load_vgg16(self, path: str | os.PathLike) -> None:
        """Load torchvision-layout VGG16 weights (`features.N.*`; `classifier.*` is ignored)."""
        sd = _load(path)
        if any(k.startswith("features.") for k in sd):
            sd = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
        # Exactly our trunk's keys are taken (torchvision's `features` ends with a weightless pool).
        own = self.features.state_dict()
        missing = sorted(set(own) - set(sd))
        if missing:
            raise ValueError(f"{path} is not a torchvision VGG16 state dict: missing {missing[:4]}")
        self.features.load_state_dict({k: sd[k] for k in own})

    def load_linear(self, path: str | os.PathLike) -> None:
        """Load the LPIPS linear layers (`lin{k}.model.1.weight` as saved by PerceptualSimilarity)."""
        sd = _load(path)
        for k, lin in enumerate(self.lins):
            key = next((n for n in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight") if n in sd), None)
            if key is None:
                raise ValueError(f"{path} has no LPIPS linear weights lin{k}.model.*.weight")
            w = sd[key]
            if w.min() < 0:
                raise ValueError(f"{path}: {key} has negative weights; LPIPS linear weights are >= 0")
            lin.weight.data.copy_(w)

    def train(self, mode: bool = True) -> LPIPS:
        """Always in eval mode: the metric is frozen whatever the surrounding module does."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance between `x` and `y` (both (B, 3, H, W) in [-1, 1]); shape (B,)."""
        b = x.shape[0]
        # One trunk pass over both batches: VGG has no batch statistics, so this changes nothing but speed.
        h = (torch.cat([x, y]) - self.shift) / self.scale
        dist = x.new_zeros(b)
        taps = iter(zip(LPIPS_TAPS, self.lins))
        tap, lin = next(taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == tap:
                fx, fy = _normalize(h[:b]), _normalize(h[b:])
                dist = dist + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))
                tap, lin = next(taps, (None, None))
                if tap is None:
                    break
        return dist
