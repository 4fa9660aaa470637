"""ldm: train, fine-tune, evaluate and sample latent diffusion models (the Stable Diffusion family)."""

__version__ = "0.1.0"
