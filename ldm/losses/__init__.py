"""Losses for training the autoencoder: LPIPS perceptual distance, patch discriminator, GAN losses, and the
combined reconstruction + KL + adversarial loss (CompVis `ldm/modules/losses/contperceptual.py`)."""

from ldm.losses.autoencoder_loss import AutoencoderLoss, adaptive_weight
from ldm.losses.discriminator import NLayerDiscriminator
from ldm.losses.gan import generator_loss, hinge_d_loss, vanilla_d_loss
from ldm.losses.perceptual import LPIPS

__all__ = [
    "LPIPS",
    "AutoencoderLoss",
    "NLayerDiscriminator",
    "adaptive_weight",
    "generator_loss",
    "hinge_d_loss",
    "vanilla_d_loss",
]
