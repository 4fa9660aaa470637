"""NoiseSchedule against diffusers' schedulers (the oracle; imported here only, never from ldm/)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from ldm.diffusion import NoiseSchedule, karras_sigmas, sigma_to_vp

SD = dict(beta_start=0.00085, beta_end=0.012)
SCHEDULES = [
    ("linear", False),
    ("scaled_linear", False),
    ("squaredcos_cap_v2", False),
    ("linear", True),
    ("scaled_linear", True),
    ("squaredcos_cap_v2", True),
]


def _diffusers_kwargs(beta_schedule="scaled_linear", rescale=False, spacing="leading", offset=0):
    """A diffusers scheduler config with SD's beta range."""
    return dict(
        beta_schedule=beta_schedule,
        rescale_betas_zero_snr=rescale,
        timestep_spacing=spacing,
        steps_offset=offset,
        **SD,
    )


@pytest.mark.parametrize("beta_schedule,rescale", SCHEDULES)
def test_alphas_cumprod_match_ddpm_scheduler(beta_schedule, rescale):
    """Ours (float64) equals diffusers' DDPMScheduler (float32) up to float32 rounding."""
    ours = NoiseSchedule(beta_schedule, rescale_zero_terminal_snr=rescale, **SD)
    theirs = DDPMScheduler(**_diffusers_kwargs(beta_schedule, rescale))
    assert ours.alphas_cumprod.dtype == torch.float64
    # float32 cumprod over 1000 steps drifts by ~6e-7 absolute; a wrong schedule is off by >1e-3.
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=0, atol=1e-6)
    # alphas = abar_t / abar_{t-1}: dividing two small float32 numbers near a zero-SNR end loses more.
    torch.testing.assert_close(ours.alphas, theirs.alphas.double(), rtol=0, atol=1e-5)
    if rescale:
        assert ours.alphas_cumprod[-1] == 0 and ours.betas[-1] == 1
        assert math.isinf(ours.sigmas[-1]) and math.isfinite(ours.sigma_max)
        assert ours.snr(ours.num_train_timesteps - 1) == 0
    else:
        # Relative check on the small tail too (cosine reaches 2e-9).
        torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=1e-4, atol=0)


def test_schedule_shapes_and_aliases():
    """SD defaults, CompVis' "ldm_linear" alias, monotone sigmas, invalid names rejected."""
    s = NoiseSchedule()
    assert s.beta_schedule == "scaled_linear" and s.num_train_timesteps == 1000
    torch.testing.assert_close(s.alphas_cumprod, NoiseSchedule("ldm_linear").alphas_cumprod, rtol=0, atol=0)
    assert torch.all(s.sigmas[1:] > s.sigmas[:-1])
    torch.testing.assert_close(s.log_sigmas, s.sigmas.log())
    assert s.sigma_min == pytest.approx(float(s.sigmas[0]))
    assert s.sigma_max == pytest.approx(float(s.sigmas[-1]))
    with pytest.raises(ValueError):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError):
        NoiseSchedule(timestep_spacing="evenly")
    with pytest.raises(ValueError):
        s.timesteps(1001)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [50, 30, 7])
def test_timesteps_match_ddim_and_euler(spacing, steps):
    """Integer timesteps equal DDIMScheduler's; float ones equal EulerDiscreteScheduler's."""
    offset = 1 if spacing == "leading" else 0
    kwargs = _diffusers_kwargs(spacing=spacing, offset=offset)
    ours = NoiseSchedule.from_diffusers_config(kwargs)
    ddim = DDIMScheduler(**kwargs)
    ddim.set_timesteps(steps)
    assert torch.equal(ours.timesteps(steps), ddim.timesteps)
    euler = EulerDiscreteScheduler(**kwargs)
    euler.set_timesteps(steps)
    # Euler builds linspace in float32; ours is float64.
    euler_t = euler.timesteps.double()
    torch.testing.assert_close(ours.timesteps(steps, discrete=False), euler_t, rtol=0, atol=1e-4)
    # Explicit arguments override the stored defaults.
    other = NoiseSchedule(timestep_spacing="trailing", steps_offset=0)
    assert torch.equal(other.timesteps(steps, spacing=spacing, steps_offset=offset), ddim.timesteps)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_sampling_sigmas_match_euler(spacing, rescale):
    """Sigma grids (plain and Karras) equal EulerDiscreteScheduler.sigmas, trailing zero included."""
    kwargs = _diffusers_kwargs(spacing=spacing, rescale=rescale, offset=1 if spacing == "leading" else 0)
    ours = NoiseSchedule.from_diffusers_config(kwargs)
    for karras in (False, True):
        euler = EulerDiscreteScheduler(**kwargs, use_karras_sigmas=karras)
        euler.set_timesteps(30)
        sigmas = ours.sampling_sigmas(30, karras=karras)
        assert sigmas.shape == (31,) and sigmas[-1] == 0
        torch.testing.assert_close(sigmas, euler.sigmas.double(), rtol=5e-5, atol=0)
        if karras:  # the network timesteps of a Karras grid come from sigma_to_t
            torch.testing.assert_close(
                ours.sigma_to_t(sigmas[:-1]).double(), euler.timesteps.double(), rtol=0, atol=1e-2
            )
    # Before the appended zero, the full training grid is Euler's `sigmas` at construction.
    euler = EulerDiscreteScheduler(**kwargs)
    train_sigmas = ours.t_to_sigma(torch.arange(1000)).flip(0)
    torch.testing.assert_close(train_sigmas, euler.sigmas[:-1].double(), rtol=5e-5, atol=0)


def test_karras_sigmas_formula():
    """Karras et al. 2022 eq. 5: end points, monotone, and rho = 1 is linear in sigma."""
    s = karras_sigmas(10, 0.03, 14.6, rho=7.0)
    assert s[0] == pytest.approx(14.6) and s[-1] == pytest.approx(0.03)
    assert torch.all(s[1:] < s[:-1])
    linear = torch.linspace(5, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(karras_sigmas(5, 1.0, 5.0, rho=1.0), linear)
    i = 3
    expected = (14.6 ** (1 / 7) + i / 9 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    assert float(s[i]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rescale", [False, True])
def test_sigma_to_t_inverts_t_to_sigma(rescale):
    """Round trips at integer t (both interpolations) and, in log space, at fractional t; clamping at ends."""
    s = NoiseSchedule(rescale_zero_terminal_snr=rescale)
    t = torch.arange(1000, dtype=torch.float64)
    for interpolation in ("log", "linear"):
        back = s.sigma_to_t(s.t_to_sigma(t, interpolation)).double()
        torch.testing.assert_close(back, t, rtol=0, atol=1e-3)
    frac = torch.rand(64, dtype=torch.float64) * 999
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(frac)).double(), frac, rtol=0, atol=1e-3)
    assert float(s.sigma_to_t(torch.tensor(1e-6))) == 0
    assert float(s.sigma_to_t(torch.tensor(1e6))) == 999
    assert float(s.sigma_to_t(torch.tensor(math.inf))) == 999
    assert s.sigma_to_t(torch.tensor([1.0, 2.0], dtype=torch.float16)).dtype == torch.float32


def test_sigma_to_t_matches_diffusers():
    """Off-grid sigmas map to the same fractional t as diffusers' Euler `_sigma_to_t`."""
    s = NoiseSchedule()
    euler = EulerDiscreteScheduler(**_diffusers_kwargs())
    log_sigmas = np.log(((1 - euler.alphas_cumprod) / euler.alphas_cumprod).numpy() ** 0.5)
    sigma = torch.exp(torch.empty(100, dtype=torch.float64).uniform_(-4, 3))
    theirs = torch.from_numpy(euler._sigma_to_t(sigma.numpy(), log_sigmas)).double()
    torch.testing.assert_close(s.sigma_to_t(sigma).double(), theirs, rtol=0, atol=1e-3)


def test_vp_coefficients_snr_and_add_noise():
    """alpha_t^2 + sigma_t^2 = 1, sigma = sigma_t/alpha_t, snr = 1/sigma^2, add_noise = DDPMScheduler's."""
    s = NoiseSchedule()
    t = torch.tensor([0, 10, 500, 999])
    alpha_t, sigma_t = s.vp_coefficients(t)
    torch.testing.assert_close(alpha_t**2 + sigma_t**2, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(sigma_t / alpha_t, s.sigmas[t])
    torch.testing.assert_close(s.snr(t), s.sigmas[t] ** -2)
    torch.testing.assert_close(s.snr(t.double()), s.sigmas[t] ** -2)  # float t interpolates, exact on grid
    a2, s2 = s.vp_coefficients(t.double())
    torch.testing.assert_close((a2, s2), (alpha_t, sigma_t))
    z0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    theirs = DDPMScheduler(**_diffusers_kwargs()).add_noise(z0, noise, t)
    torch.testing.assert_close(s.add_noise(z0, noise, t), theirs, rtol=1e-5, atol=1e-5)
    # VE/VP limits.
    a, b = sigma_to_vp(torch.tensor([0.0, math.inf]))
    assert a.tolist() == [1.0, 0.0] and b.tolist() == [0.0, 1.0]


def test_diffusers_config_round_trip():
    """to_diffusers_config loads in diffusers (same alphas_cumprod); from_diffusers_config inverts it."""
    zero_snr = dict(beta_schedule="cosine", rescale_zero_terminal_snr=True, timestep_spacing="trailing")
    for kwargs in (dict(), zero_snr):
        ours = NoiseSchedule(**kwargs)
        config = ours.to_diffusers_config(prediction_type="v_prediction")
        assert config["prediction_type"] == "v_prediction"
        ddim = DDIMScheduler.from_config(config)
        torch.testing.assert_close(ours.alphas_cumprod, ddim.alphas_cumprod.double(), rtol=0, atol=1e-6)
        again = NoiseSchedule.from_diffusers_config(dict(ddim.config))
        assert again.to_diffusers_config() == ours.to_diffusers_config()
    # SD1's released scheduler_config.json values (runwayml/stable-diffusion-v1-5 scheduler/).
    assert NoiseSchedule().to_diffusers_config() == {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "rescale_betas_zero_snr": False,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


def test_to_dtype_copy():
    """.to(dtype=float32) returns a float32 copy and leaves the float64 original alone."""
    s = NoiseSchedule()
    s32 = s.to(dtype=torch.float32)
    assert s32.alphas_cumprod.dtype == torch.float32 and s.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(s32.sigmas.double(), s.sigmas, rtol=1e-6, atol=0)
    assert s32.t_to_sigma(torch.tensor(10.5)).dtype == torch.float32
