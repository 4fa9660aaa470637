"""Tiny SD-shaped models with random weights, shared by the tests (no downloads, seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.checkpoints import save_diffusers_folder
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.unet import UNetModel

REPO = Path(__file__).resolve().parents[1]


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, also where the reference zero-initializes (else those paths go untested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


UNET_KW = dict(
    model_channels=32, channel_mult=[1, 2, 2, 2], attention_resolutions=[4, 2, 1], num_res_blocks=2,
    num_heads=8, num_head_channels=-1, context_dim=32, transformer_depth=1,
    use_linear_in_transformer=False, upcast_attention=False,
)  # fmt: skip
UNET_KW_SD2 = dict(
    UNET_KW, num_heads=-1, num_head_channels=32, use_linear_in_transformer=True, upcast_attention=True
)
VAE_KW = dict(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, scale_factor=0.18215)
SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False,
}  # fmt: skip


def text_conditioner(config: dict | None = None):
    """The tiny CLIP text encoder (configs/model/conditioner/tiny.yaml), its `config` updated by `config`."""
    cfg = OmegaConf.load(REPO / "configs/model/conditioner/tiny.yaml")
    cfg.config = OmegaConf.merge(cfg.config, config or {})
    cond = instantiate(cfg)
    randomize_(cond.transformer, seed=3)
    return cond


def text_state(cond) -> dict[str, torch.Tensor]:
    """The conditioner's CLIP weights with the classic `text_model.*` keys that files store."""
    return {k.removeprefix("transformer."): v for k, v in cond.state_dict().items()}


def save_tiny_sd_folder(
    path: Path,
    seed: int = 11,
    unet_kw: dict | None = None,
    vae_kw: dict | None = None,
    text_config: dict | None = None,
) -> Path:
    """A diffusers StableDiffusionPipeline folder of a narrow SD-shaped model (64 px images, 8x8 latents);
    `unet_kw`, `vae_kw`: other networks (our constructor arguments; the UNet's context width is set to the
    text encoder's), `text_config`: changes to the tiny CLIP text encoder's config."""
    torch.manual_seed(seed)
    cond = text_conditioner(text_config)
    vae_kw = vae_kw or VAE_KW
    unet_kw = dict(unet_kw or UNET_KW, context_dim=cond.transformer.config.hidden_size)
    unet = randomize_(UNetModel(**unet_kw), seed=seed)
    # Small weights on the UNet output keep the sampling chain well-conditioned with random weights.
    with torch.no_grad():
        unet.out[-1].weight.mul_(0.05)
    vae = randomize_(AutoencoderKL(**vae_kw), seed=seed + 1)
    save_diffusers_folder(
        path, unet=unet.state_dict(), unet_kwargs=unet_kw, vae=vae.state_dict(), vae_kwargs=vae_kw,
        text_encoder=text_state(cond), text_encoder_config=cond.transformer.config, tokenizer=cond.tokenizer,
        scheduler_config=SCHEDULER, sample_size=8,
    )  # fmt: skip
    return path
