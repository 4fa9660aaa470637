"""Adversarial losses on discriminator logits (taming `taming/modules/losses/vqperceptual.py`).

The discriminator minimizes `hinge_d_loss` (Lim & Ye 2017; Miyato et al. 2018, eq. 17) or
`vanilla_d_loss` (Goodfellow et al. 2014, the non-saturating logistic loss written with softplus); the
generator minimizes `generator_loss` = -mean(logits_fake) in both cases, as in taming and CompVis.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean(-log sigmoid(D(x))) + mean(-log(1 - sigmoid(D(G(z)))))), via softplus for stability."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    """-mean(D(G(z))): the generator pushes its samples' logits up (taming, CompVis)."""
    return -torch.mean(logits_fake)


D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def get_d_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The discriminator loss called `name` ("hinge" or "vanilla")."""
    if name not in D_LOSSES:
        raise ValueError(f"unknown discriminator loss {name!r}; choose from {sorted(D_LOSSES)}")
    return D_LOSSES[name]
