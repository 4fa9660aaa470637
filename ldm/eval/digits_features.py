"""`DigitsFeatures`: a feature space for a "digits FID", a small CNN trained in seconds on real digits.

FID (Heusel et al. 2017) compares Gaussians fitted to the features of real and generated images in the
penultimate layer of a classifier trained on real images; for photos that classifier is Inception-v3 on
ImageNet. The bundled digits are not photos, so here the classifier is a small CNN trained on the training
split of scikit-learn's 8x8 digits (the split `ldm.data.digits` trains on), seen the way the shards store
them: upscaled by `digit_image` (bicubic) to the network's 16 px input, twice the digits' own 8 px, so
stroke texture and blur still show; other sizes (the shards' 32 px, generated images) are resized to 16 px
(antialiased bilinear). It is trained deterministically (fixed seed,
fixed order, one thread) at first use, in a few seconds on a CPU, and kept for the process. Its
penultimate features react to the digit's shape and to its strokes, so the distance sees realism and
diversity, not only readability (which the SVC of `ldm.eval.digits` scores).

Usable directly as torchmetrics' feature extractor:

    FrechetInceptionDistance(feature=DigitsFeatures())   # uint8 N x 3 x H x W images, normalize=False
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

VERSION = 1
SHARD_SIDE = 32  # the shards' resolution (ldm.data.digits)
SIDE = 16  # network input side (antialiased bilinear resize): twice the digits' 8 px


def real_digit_images(
    indices: list[int] | None = None, resolution: int = SHARD_SIDE
) -> tuple[Tensor, Tensor]:
    """(uint8 N x 3 x R x R images, labels) of scikit-learn's digits after the shard writer's upscaling."""
    from sklearn.datasets import load_digits

    from ldm.data.digits import digit_image

    data = load_digits()
    idx = list(range(len(data.target))) if indices is None else list(indices)
    images = np.stack([np.asarray(digit_image(data.images[i], resolution)) for i in idx])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(data.target[idx])


@functools.lru_cache(maxsize=4)
def split_images(part: str, resolution: int = SHARD_SIDE) -> tuple[Tensor, Tensor]:
    """`real_digit_images` of the "train" or "heldout" split (cached per process; do not modify)."""
    if part not in ("train", "heldout"):
        raise ValueError(f"part={part!r}: expected 'train' or 'heldout'")
    train, heldout = digits_split(0)
    return real_digit_images(train if part == "train" else heldout, resolution)


def digits_split(seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of scikit-learn's digits: the split `ldm.data.digits` uses."""
    from sklearn.datasets import load_digits

    from ldm.data.digits import split_digits

    return split_digits(load_digits().target, 0.1, seed)


class _Net(nn.Module):
    """conv 16 -> pool -> conv 32 -> pool -> conv 64 -> 2x2 average -> `width` tanh features -> 10 classes."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(64 * 4, width), nn.Tanh(),
        )  # fmt: skip
        self.head = nn.Linear(width, 10)


def _to_input(images: Tensor) -> Tensor:
    """uint8 (0..255) or float (0..1) N x C x H x W -> float N x 1 x 16 x 16 in [-1, 1] (grey)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"DigitsFeatures takes N x 3 x H x W (or N x 1 x H x W) images, got {tuple(images.shape)}"
        )
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (SIDE, SIDE):
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
    return x * 2 - 1


@functools.lru_cache(maxsize=1)
def _training_inputs() -> tuple[Tensor, Tensor]:
    """The training split as network inputs, with labels (computed once per process): upscaled by the
    shard writer's `digit_image` straight to the network's side (bicubic, 8 -> 16 px)."""
    images, labels = split_images("train", SIDE)
    return _to_input(images), labels


@functools.lru_cache(maxsize=4)
def _trained_state(seed: int, width: int, epochs: int) -> dict[str, Tensor]:
    """Train `_Net` on the training split, deterministically: seeded init and batch order, one CPU thread
    (the reduction order of multithreaded CPU kernels would change the weights in the last bits)."""
    x, labels = _training_inputs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _Net(width)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for batch in order.split(64):
                # Small random shifts (+-1 px) so features generalize beyond the exact upscaled grid.
                dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
                xb = torch.roll(x[batch], shifts=(dy, dx), dims=(2, 3))
                loss = F.cross_entropy(net.head(net.body(xb)), labels[batch].long())
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


class DigitsFeatures(nn.Module):
    """Penultimate-layer features (float N x `num_features`) of a small CNN classifier of real digits.

    `forward` takes uint8 N x 3 x H x W images (0..255, as torchmetrics' FID/KID pass them with
    normalize=False) or float images in [0, 1]; any size, resized to 16 px. `logits` gives the class
    scores. Weights are trained at construction (seconds; cached per process) from the training split of
    scikit-learn's digits; `identity` names the recipe, to print beside every number measured with it."""

    def __init__(self, seed: int = 0, num_features: int = 64, epochs: int = 8):
        super().__init__()
        self.num_features = int(num_features)
        self.net = _Net(self.num_features)
        self.net.load_state_dict(_trained_state(int(seed), self.num_features, int(epochs)))
        self.requires_grad_(False).eval()
        self.identity = f"digits-cnn16-v{VERSION}-seed{seed}-w{num_features}-e{epochs}"

    def train(self, mode: bool = True) -> DigitsFeatures:
        return super().train(False)  # a fixed feature extractor: always in eval mode

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net.body(_to_input(images.to(self.net.head.weight.device)))

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        return self.net.head(self.forward(images))
