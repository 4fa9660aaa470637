"""Classifier-free guidance wrapper: one batched call, the Ho & Salimans formula on every channel, both views,
and diffusers' guidance rescale."""

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import GuidedNet, cfg_combine, cfg_denoiser, rescale_cfg
from ldm.diffusion.samplers import sampling_plan
from ldm.diffusion.schedule import NoiseSchedule


class ContextNet:
    """A toy conditional network: the output depends on x, t and a (B, L, D) context in every channel, and
    every call is recorded with its batch size."""

    def __init__(self, out_channels: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(out_channels, 4, generator=g)
        self.context_proj = torch.randn(out_channels, 8, generator=g)
        self.batches: list[int] = []

    def __call__(self, x, t, context=None, **kwargs):
        """Output (B, out_channels, H, W)."""
        self.batches.append(x.shape[0])
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        mixed = torch.einsum("oc,bchw->bohw", self.weight.to(x.dtype), x)
        cond = torch.einsum("od,bd->bo", self.context_proj.to(x.dtype), context.mean(1))[..., None, None]
        out = torch.tanh(mixed) * (1 + cond) + torch.sin(t / 100) * cond
        if "hint" in kwargs:
            out = out + kwargs["hint"]
        return out


def _inputs(batch=3):
    """x (B, 4, 5, 5), a conditional and an unconditional context (B, 6, 8)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 5, 5, generator=g)
    return x, torch.randn(batch, 6, 8, generator=g), torch.randn(batch, 6, 8, generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sigma_view_equals_two_separate_calls_in_one_batch(prediction_type):
    """guided(x, sigma) = D_u + w (D_c - D_u) with D_u, D_c from separate unguided calls (guiding the raw
    output is guiding z0, the maps being affine at fixed x, sigma), from a single network call of batch 2B."""
    schedule = NoiseSchedule()
    net = ContextNet()
    plain = Denoiser(net, schedule, prediction_type)
    guided = cfg_denoiser(plain, scale=6.0)
    x, cond, uncond = _inputs()
    sigma = torch.tensor([0.5, 3.0, 14.0])
    out = guided(x, sigma, context=cond, uncond_context=uncond)
    assert net.batches == [6]
    d_cond, d_uncond = plain(x, sigma, cond), plain(x, sigma, uncond)
    torch.testing.assert_close(out, d_uncond + 6.0 * (d_cond - d_uncond), rtol=1e-5, atol=1e-5)


def test_timestep_view_is_guided():
    """predict_at on the guided denoiser equals convert_at of the guided raw output (what diffusers' pipeline
    hands its scheduler) and counts one network call."""
    schedule = NoiseSchedule()
    net = ContextNet()
    plain = Denoiser(net, schedule, "v_prediction")
    x, cond, uncond = _inputs()
    z0, eps = cfg_denoiser(plain, scale=4.0).predict_at(x, 500, context=cond, uncond_context=uncond)
    assert net.batches == [6]
    t = torch.full((3,), 500)
    raw = cfg_combine(net(x, t, uncond), net(x, t, cond), 4.0)
    expected_z0, expected_eps = plain.convert_at(raw, x, 500)
    torch.testing.assert_close(z0, expected_z0)
    torch.testing.assert_close(eps, expected_eps)


def test_every_output_channel_is_guided():
    """The combination applies to all output channels, including extra ones (e.g. learned variance), and a
    batch-1 negative context is shared by the batch."""
    net = ContextNet(out_channels=8)
    x, cond, _ = _inputs()
    negative = torch.randn(1, 6, 8)
    t = torch.full((3,), 250)
    out = GuidedNet(net, scale=3.0)(x, t, cond, uncond_context=negative)
    expected = cfg_combine(net(x, t, negative.expand(3, -1, -1)), net(x, t, cond), 3.0)
    assert out.shape == (3, 8, 5, 5)
    torch.testing.assert_close(out, expected)
    cond_only = net(x, t, cond)
    assert all((out[:, c] - cond_only[:, c]).abs().max() > 1e-3 for c in range(8))


def test_rescale_matches_diffusers():
    """guidance_rescale equals diffusers' rescale_noise_cfg on the guided and conditional outputs."""
    net = ContextNet()
    x, cond, uncond = _inputs()
    t = torch.full((3,), 700)
    out = GuidedNet(net, scale=7.5, rescale=0.7)(x, t, cond, uncond_context=uncond)
    out_cond = net(x, t, cond)
    guided = cfg_combine(net(x, t, uncond), out_cond, 7.5)
    torch.testing.assert_close(out, rescale_noise_cfg(guided, out_cond, guidance_rescale=0.7))
    torch.testing.assert_close(rescale_cfg(guided, out_cond, 0.0), guided)
    # At rescale 1 the output takes the conditional output's per-sample std.
    full = rescale_cfg(guided, out_cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), out_cond.std(dim=(1, 2, 3)))


def test_scale_one_runs_conditional_only_and_missing_uncond_is_an_error():
    """Scale 1 is the conditional output of a batch-B call; any other scale needs an unconditional context."""
    net = ContextNet()
    x, cond, _ = _inputs()
    t = torch.full((3,), 100)
    torch.testing.assert_close(GuidedNet(net, scale=1.0)(x, t, cond), net(x, t, cond))
    assert net.batches == [3, 3]
    with pytest.raises(ValueError, match="uncond_context"):
        GuidedNet(net, scale=2.0)(x, t, cond)


def test_per_sample_scale_dict_context_and_batched_kwargs():
    """A (B,) scale guides each sample with its own strength; dict contexts are paired key by key; tensor
    kwargs with the batch size are duplicated for both halves."""
    batches = []

    def net(x, t, context, hint=None):
        """Output from a dict context {"tokens": (B, L, D), "pooled": (B, D)} plus a hint."""
        batches.append(x.shape[0])
        return (
            x * context["pooled"][:, :4, None, None]
            + context["tokens"].mean((1, 2))[:, None, None, None]
            + hint
        )

    x, cond, uncond = _inputs()
    hint = torch.randn(3, 4, 5, 5)
    c = {"tokens": cond, "pooled": cond[:, 0]}
    u = {"tokens": uncond, "pooled": uncond[:, 0]}
    scale = torch.tensor([1.0, 2.0, 5.0])
    t = torch.full((3,), 10)
    out = GuidedNet(net, scale=scale)(x, t, c, uncond_context=u, hint=hint)
    assert batches == [6]
    out_c, out_u = net(x, t, c, hint=hint), net(x, t, u, hint=hint)
    torch.testing.assert_close(out, out_u + scale[:, None, None, None] * (out_c - out_u))
    torch.testing.assert_close(out[0], out_c[0])


def test_guided_sampling_runs_through_a_sampler():
    """extra_args carry both contexts through a sampler: guided Euler makes one batched call per step."""
    schedule = NoiseSchedule()
    net = ContextNet()
    guided = cfg_denoiser(Denoiser(net, schedule, "epsilon"), scale=5.0)
    x, cond, uncond = _inputs()
    plan = sampling_plan(schedule, "euler", 6)
    out = plan(guided, plan.initial_latents(x), extra_args={"context": cond, "uncond_context": uncond})
    assert net.batches == [6] * 6 and torch.isfinite(out).all()
