"""`ldm.load_pipeline` on a tiny random SD-shaped diffusers folder against diffusers' StableDiffusionPipeline.

Same folder, same prompt, same initial latents (and the same per-step noise for the ancestral sampler
through per-image generators), same steps and guidance: the images must agree to < 1e-3 on [0, 1].
"""

from __future__ import annotations

import pytest
import torch

import ldm
from ldm.pipeline_io import save_pipeline

diffusers = pytest.importorskip("diffusers")

SCHEDULERS = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
    "heun": diffusers.HeunDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
}


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_images_match_diffusers(tiny_sd_folder, sampler):
    folder = tiny_sd_folder
    ours = ldm.load_pipeline(folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    theirs.scheduler = SCHEDULERS[sampler].from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kwargs = dict(num_inference_steps=6, guidance_scale=5.0, height=64, width=64, output_type="pt")
    expected = theirs(
        ["a photo of the digit seven"] * 2,
        negative_prompt=["blurry"] * 2,
        latents=latents,
        generator=[torch.Generator().manual_seed(100 + i) for i in range(2)],
        **kwargs,
    ).images
    got = ours(
        "a photo of the digit seven", negative_prompt="blurry", num_images_per_prompt=2, steps=6,
        guidance_scale=5.0, sampler=sampler, latents=latents, seed=100, height=64, width=64, output="tensor",
    )  # fmt: skip
    assert got.shape == expected.shape == (2, 3, 64, 64)
    assert (got - expected).abs().max().item() < 1e-3
    assert expected.std() > 0.01  # a non-trivial image


@pytest.mark.parametrize("fmt", ["ldm", "single_file", "diffusers"])
def test_save_and_reload_gives_same_images(tiny_sd_folder, tmp_path, fmt):
    folder = tiny_sd_folder
    pipe = ldm.load_pipeline(folder)
    target = tmp_path / ("model.safetensors" if fmt == "single_file" else "out")
    save_pipeline(pipe, target, fmt)
    again = ldm.load_pipeline(target)
    args = dict(prompt="a photo of the digit one", steps=3, seed=3, sampler="euler", output="tensor")
    assert torch.equal(pipe(**args), again(**args))
