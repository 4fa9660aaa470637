"""The Pipeline's contract: per-image seeds, img2img (against diffusers), inpainting that keeps
the known region, per-step callbacks, size checks, sliced decoding, half precision, format detection."""

from __future__ import annotations

import pytest
import torch

import ldm

diffusers = pytest.importorskip("diffusers")

PROMPT = "a photo of the digit three"


@pytest.fixture(scope="module")
def pipe(tiny_sd_folder):
    return ldm.load_pipeline(tiny_sd_folder)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_each_image_reproduces_from_its_own_seed(pipe, sampler):
    """Image i of a batch with seed s equals the single image with seed s + i (also for ancestral noise)."""
    args = dict(steps=4, sampler=sampler, guidance_scale=3.0, output="tensor")
    batch = pipe(PROMPT, num_images_per_prompt=3, seed=10, **args)
    for i in range(3):
        single = pipe(PROMPT, seed=10 + i, **args)
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # different seeds, different images


@pytest.mark.parametrize(
    "sampler, scheduler", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler")]
)
def test_img2img_matches_diffusers(pipe, tiny_sd_folder, sampler, scheduler):
    """Same clean latent (ours encodes the posterior mean; diffusers is handed those latents), same noise
    (per-image generators), same truncated grid: the same images."""
    image = torch.rand(1, 3, 64, 64)
    z0 = pipe.encode_image(image)
    theirs = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_sd_folder, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(
        [PROMPT] * 2, image=z0.expand(2, -1, -1, -1), strength=0.6, num_inference_steps=10,
        guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(7 + i) for i in range(2)], output_type="pt",
    ).images  # fmt: skip
    got = pipe(
        PROMPT, init_image=image, strength=0.6, steps=10, guidance_scale=4.0, sampler=sampler, seed=7,
        num_images_per_prompt=2, output="tensor",
    )  # fmt: skip
    assert (got - expected).abs().max().item() < 1e-3


def test_inpainting_keeps_the_unmasked_latent(pipe):
    image = torch.rand(1, 3, 64, 64)
    z0 = pipe.encode_image(image)
    mask = torch.zeros(1, 3, 64, 64)
    mask[..., :, 32:] = 1.0  # repaint the right half
    steps_seen = []
    pipe(
        PROMPT, init_image=image, mask=mask, strength=1.0, steps=6, sampler="euler", seed=0,
        callback=lambda info: steps_seen.append(info["x"].clone()), output="tensor",
    )  # fmt: skip
    final = steps_seen[-1]
    # Euler's last step lands on the clean estimate, which the blend fixes to z0 outside the mask.
    torch.testing.assert_close(final[..., :4], z0[..., :4], atol=1e-5, rtol=0)
    assert (final[..., 4:] - z0[..., 4:]).abs().max() > 1e-2  # the masked half was repainted


def test_callback_sees_every_step(pipe):
    seen = []
    pipe(PROMPT, steps=5, sampler="dpmpp_2m", seed=1, callback=seen.append, output="tensor")
    assert [info["i"] for info in seen] == list(range(5))
    assert all(info["x"].shape == (1, 4, 8, 8) and "denoised" in info for info in seen)


def test_sizes_must_be_multiples_of_eight(pipe):
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe(PROMPT, height=60, width=64, steps=2)
    out = pipe(PROMPT, height=72, width=40, steps=2, sampler="euler", output="tensor")
    assert out.shape == (1, 3, 72, 40)


def test_sliced_decode_equals_whole(pipe):
    z = torch.randn(5, 4, 8, 8)
    torch.testing.assert_close(pipe.decode(z, batch_size=2), pipe.decode(z, batch_size=8), atol=1e-5, rtol=0)


def test_bfloat16_sampling_is_close_to_fp32(tiny_sd_folder):
    args = dict(steps=4, sampler="ddim", seed=2, output="tensor")
    ref = ldm.load_pipeline(tiny_sd_folder)(PROMPT, **args)
    half = ldm.load_pipeline(tiny_sd_folder, dtype=torch.bfloat16)
    assert half.unet.out[-1].weight.dtype == torch.bfloat16
    assert next(half.vae.parameters()).dtype == torch.float32  # the autoencoder stays fp32
    out = half(PROMPT, **args)
    assert out.dtype == torch.float32 and (out - ref).abs().mean() < 0.05


def test_output_pil_and_errors(pipe, tmp_path):
    images = pipe([PROMPT, "a photo of the digit four"], steps=2, sampler="euler", seed=0)
    assert len(images) == 2 and images[0].size == (64, 64)
    with pytest.raises(KeyError, match="known samplers"):
        pipe(PROMPT, steps=2, sampler="not_a_sampler")
    with pytest.raises(FileNotFoundError):
        ldm.load_pipeline(tmp_path / "missing.safetensors")
