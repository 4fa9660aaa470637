"""Every registered sampler through the Pipeline, in each of its three uses (text to image, image to image,
inpainting) on a tiny SD-shaped model: finite images of the requested shape, and inpainting that keeps the
known latent outside the mask."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion.samplers import SAMPLERS
from ldm.diffusion.schedule import NoiseSchedule
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.unet import UNetModel
from ldm.pipeline import Pipeline
from tests.tiny import SCHEDULER, UNET_KW, VAE_KW, randomize_, text_conditioner

PROMPT = "a photo of the digit three"
# Each registry entry with its default options, plus the options that take a different code path:
# PLMS extrapolating raw network outputs (diffusers' PNDM for v models), stochastic DDIM, Karras sigmas.
CASES = [(name, {}) for name in SAMPLERS] + [
    ("plms", {"combine": "model_output"}),
    ("ddim", {"eta": 1.0}),
    ("dpmpp_2m_karras", {}),
]
MODES = ("text_to_image", "image_to_image", "inpainting")


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def pipe(request):
    """A tiny SD-shaped pipeline (64 px images, 8x8 latents, random weights) read as each parameterization:
    with random weights v and eps differ only in the algebra, which is what PLMS's "model_output" path and
    the inpainting blend depend on."""
    unet = randomize_(UNetModel(**UNET_KW), seed=11)
    with torch.no_grad():
        unet.out[-1].weight.mul_(0.05)  # small outputs keep the random chain well-conditioned
    vae = randomize_(AutoencoderKL(**VAE_KW), seed=12)
    schedule = NoiseSchedule.from_diffusers_config(SCHEDULER)
    return Pipeline(unet, vae, text_conditioner(), schedule, request.param, 8)


def _case_id(case):
    name, options = case
    return name + "".join(f"-{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_sampler_in_every_mode(pipe, case, mode):
    name, options = case
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=g)
    mask = torch.zeros(1, 3, 64, 64)
    mask[..., 32:] = 1.0  # repaint the right half
    inputs = {
        "text_to_image": {},
        "image_to_image": {"init_image": image, "strength": 0.75},
        "inpainting": {"init_image": image, "mask": mask, "strength": 1.0},
    }[mode]
    latents_seen = []
    out = pipe(
        [PROMPT, "seven"], steps=4, guidance_scale=3.0, sampler=name, seed=5, output="tensor",
        callback=lambda info: latents_seen.append(info["x"]), **inputs, **options,
    )  # fmt: skip
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    # Image to image runs int(steps * strength) of the 4 steps; the others all of them.
    assert len(latents_seen) == (3 if mode == "image_to_image" else 4)
    if mode != "inpainting":
        return
    # Checked on the latent: with random weights the decoder's mid-block attention mixes the whole latent,
    # so decoded pixels of the kept half are no closer to the init image than a text-to-image sample's.
    z0 = pipe.encode_image(image)
    final = latents_seen[-1]
    assert torch.isfinite(final).all()
    # Samplers that end at the clean level land on the blended clean estimate, z0 outside the mask. DDIM and
    # PLMS end at alphas_cumprod[0] (SD's set_alpha_to_one=False): sqrt(a0) z0 + sqrt(1 - a0) eps, within
    # a few hundredths of z0.
    ends_clean = not SAMPLERS[name.removesuffix("_karras")].uses_timesteps or name == "ddpm"
    tolerance = 1e-5 if ends_clean else 0.15
    known = (final[..., :4] - z0[..., :4]).abs().max().item()
    assert known < tolerance, known
    assert (final[..., 4:] - z0[..., 4:]).abs().max() > 0.1  # the masked half was repainted
