"""Samplers on data whose exact denoiser is known: z0 ~ N(MU, S^2) independently per dimension.

For VP x_t = alpha_t z0 + sigma_t eps the posterior mean is E[z0 | x_t] = MU + alpha_t S^2 / (alpha_t^2 S^2 +
sigma_t^2) (x_t - alpha_t MU) (in VE scaling MU + S^2 / (S^2 + sigma^2) (x - MU)), finite even at
alpha_t = 0, so an exact eps / v / x0 "network" exists for any schedule, zero terminal SNR included. The
marginal at every level is Gaussian and the probability-flow ODE is linear: x_VP(b) = alpha_b MU +
sqrt(alpha_b^2 S^2 + sigma_b^2) (x_VP(a) - alpha_a MU) / sqrt(alpha_a^2 S^2 + sigma_a^2). That gives (1) the
exact final distribution for every sampler and (2) the exact ODE endpoint of each deterministic sampler's
trajectory, hence its order.
"""

import math

import numpy as np
import pytest
import torch

from ldm.diffusion.denoiser import Denoiser, append_dims
from ldm.diffusion.samplers import get_sampler, sampling_plan
from ldm.diffusion.schedule import NoiseSchedule, karras_sigmas, sigma_to_vp

MU, S = 0.5, 0.8
PREDICTIONS = ("epsilon", "v_prediction", "sample")


class GaussianNet:
    """The exact network for N(MU, S^2) data: its eps, v or x0 output at timestep t (integer: the exact
    table, alpha = 0 at a zero-SNR end; fractional: the schedule's interpolation, as the sigma view uses)."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str) -> None:
        self.schedule, self.prediction_type = schedule, prediction_type

    def __call__(self, x_t, t, context=None):
        """Exact output for VP-scaled x_t."""
        alpha, sigma = (append_dims(c.to(x_t), x_t.ndim) for c in self.schedule.vp_coefficients(t))
        x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x_t - alpha * MU)
        eps = (x_t - alpha * x0) / sigma
        return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[self.prediction_type]


def _vp_at(schedule: NoiseSchedule, level: float, uses_timesteps: bool) -> tuple[float, float]:
    """(alpha, sigma_t) of a grid entry: a timestep (negative = clean) or a VE sigma."""
    if uses_timesteps:
        abar = 1.0 if level < 0 else float(schedule.alphas_cumprod[int(level)])
        return math.sqrt(abar), math.sqrt(1 - abar)
    alpha, sigma = sigma_to_vp(torch.tensor(float(level), dtype=torch.float64))
    return float(alpha), float(sigma)


def _marginal(schedule, level, uses_timesteps, noise):
    """A sample of the exact marginal at a grid level from standard normal `noise`, in the sampler's scaling
    (VP for timestep samplers, VE = VP / alpha for sigma samplers)."""
    alpha, sigma = _vp_at(schedule, level, uses_timesteps)
    x_vp = alpha * MU + math.sqrt(alpha**2 * S**2 + sigma**2) * noise
    return x_vp if uses_timesteps else x_vp / alpha


def _exact_flow(schedule, x, start, end, uses_timesteps):
    """The probability-flow ODE solution at level `end` from x at level `start` (closed form for Gaussian
    data)."""
    a0, s0 = _vp_at(schedule, start, uses_timesteps)
    a1, s1 = _vp_at(schedule, end, uses_timesteps)
    x_vp = x if uses_timesteps else x * a0
    out = a1 * MU + math.sqrt(a1**2 * S**2 + s1**2) / math.sqrt(a0**2 * S**2 + s0**2) * (x_vp - a0 * MU)
    return out if uses_timesteps else out / a1


def _standard_noise(n=20_000, seed=0):
    """Standard normal draws shaped (8, n / 8), standardized to sample mean 0 and std 1 exactly, so a
    deterministic (affine) sampler's output statistics carry no sampling error."""
    z = torch.randn(8, n // 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean()) / z.std()


SD = NoiseSchedule()
ZERO_SNR = NoiseSchedule(rescale_zero_terminal_snr=True, timestep_spacing="trailing")
# (steps, tolerance on the relative error of the final std): first-order ODE solvers need more steps,
# ancestral ones more still (their distributional error falls slowly); measured errors are about half these.
BUDGET = {
    "ddim": (100, 0.04),
    "euler": (100, 0.04),
    "heun": (50, 0.025),
    "dpmpp_2m": (50, 0.025),
    "plms": (50, 0.025),
    "dpmpp_2m_sde": (100, 0.025),
    "ddpm": (400, 0.03),
    "euler_a": (400, 0.03),
}
STOCHASTIC = {"ddpm", "euler_a", "dpmpp_2m_sde"}
DIST_CASES = [(n, p, "sd") for n in BUDGET for p in PREDICTIONS] + [
    (n, p, "zero_snr") for n in BUDGET for p in ("v_prediction", "sample")
]


@pytest.mark.parametrize(("name", "prediction_type", "schedule_name"), DIST_CASES)
def test_final_distribution(name, prediction_type, schedule_name):
    """Started from the exact marginal at the first grid level, every sampler ends at the exact marginal of
    the last level: N(MU, S^2) at sigma = 0, N(alpha MU, alpha^2 S^2 + sigma^2) at DDIM's alphas_cumprod[0].
    Zero-SNR: the timestep samplers start from pure noise at alpha = 0 (an eps network cannot be evaluated
    there, so only v and x0), the sigma samplers from sigma ~ 4096."""
    schedule = SD if schedule_name == "sd" else ZERO_SNR
    steps, tolerance = BUDGET[name]
    plan = sampling_plan(schedule, name, steps)
    noise = _standard_noise()
    x = _marginal(schedule, plan.grid[0], plan.uses_timesteps, noise)
    denoiser = Denoiser(GaussianNet(schedule, prediction_type), schedule, prediction_type)
    out = plan(denoiser, x, generator=torch.Generator().manual_seed(1))
    alpha, sigma = _vp_at(schedule, plan.grid[-1], plan.uses_timesteps)
    mean, std = (alpha * MU, math.sqrt(alpha**2 * S**2 + sigma**2))
    if not plan.uses_timesteps:
        mean, std = mean / alpha, std / alpha
    # The mean MU is an exact invariant of every consistent sampler on this data; only fresh noise moves it.
    mean_tolerance = 5 * std / math.sqrt(out.numel()) if name in STOCHASTIC else 1e-9
    assert abs(out.mean().item() - mean) < mean_tolerance
    assert abs(out.std().item() / std - 1) < tolerance


def _ode_error(name, prediction_type, steps, **options):
    """RMS distance from the exact ODE endpoint for a deterministic sampler on a grid refined with `steps`:
    Karras sigmas from sigma_max to sigma_min for sigma samplers, uniform timesteps 980 -> 20 for the
    timestep samplers (uniform steps, where linear multistep coefficients apply)."""
    schedule = SD
    if name in ("ddim", "plms"):
        grid, uses_timesteps = (
            torch.from_numpy(np.linspace(980, 20, steps + 1).round().astype(np.int64)),
            True,
        )
    else:
        grid, uses_timesteps = karras_sigmas(steps + 1, schedule.sigma_min, schedule.sigma_max), False
    noise = _standard_noise(2_000)
    x = _marginal(schedule, grid[0], uses_timesteps, noise)
    denoiser = Denoiser(GaussianNet(schedule, prediction_type), schedule, prediction_type)
    out = get_sampler(name)(denoiser, x, grid, **options)
    exact = _exact_flow(schedule, x, grid[0], grid[-1], uses_timesteps)
    return (out - exact).pow(2).mean().sqrt().item()


# Claimed order and the interval its log-log slope must fall in. PLMS uses 4th-order Adams-Bashforth
# coefficients, but they assume equal steps in the variable DDIM is linear in (sigma_VE), which uniform
# timesteps are not; with smoothly varying steps the constant coefficients leave a 2nd-order method.
ORDERS = {
    "ddim": (1, (0.85, 1.2)),
    "euler": (1, (0.85, 1.2)),
    "heun": (2, (1.8, 2.4)),
    "dpmpp_2m": (2, (1.7, 2.4)),
    "plms": (2, (1.8, 3.0)),
}


@pytest.mark.parametrize("name", sorted(ORDERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_convergence_order(name, prediction_type):
    """Error against the exact ODE solution falls as steps^-order (slope of a log-log fit, 12 to 96 steps)."""
    steps = [12, 24, 48, 96]
    errors = [_ode_error(name, prediction_type, n) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    low, high = ORDERS[name][1]
    assert low < slope < high, f"{name}: errors {errors}, slope {slope:.2f}"
    assert errors[-1] < 0.02


def test_plms_model_output_combination_is_first_order_for_v():
    """diffusers' PNDMScheduler extrapolates raw v outputs and converts at the current x_t (our
    combine="model_output", kept for parity): for a v network that is only first order, which is why our
    default extrapolates eps (then every parameterization gives the same, 2nd-order, trajectory)."""
    steps = [12, 24, 48, 96]
    errors = [_ode_error("plms", "v_prediction", n, combine="model_output") for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert 0.8 < slope < 1.3
    assert errors[-1] > 5 * _ode_error("plms", "v_prediction", 96)


@pytest.mark.parametrize(("timestep_sampler", "sigma_sampler"), [("ddim", "euler"), ("ddpm", "euler_a")])
def test_timestep_and_sigma_views_agree(timestep_sampler, sigma_sampler):
    """DDIM (eta 0) is Euler in VE and DDPM is ancestral Euler (eta 1) in VE, step for step: on the same grid,
    from the same start and the same noise they give the same samples (Karras et al. 2022, App. B.2)."""
    schedule = SD
    denoiser = Denoiser(GaussianNet(schedule, "v_prediction"), schedule, "v_prediction")
    timesteps = torch.cat([schedule.timesteps(25), torch.tensor([-1])])
    sigmas = schedule.sampling_sigmas(25)
    noise = _standard_noise(4_000)
    x_vp = _marginal(schedule, timesteps[0], True, noise)
    ours_vp = get_sampler(timestep_sampler)(
        denoiser, x_vp, timesteps, generator=torch.Generator().manual_seed(3)
    )
    x_ve = x_vp / _vp_at(schedule, timesteps[0], True)[0]
    ours_ve = get_sampler(sigma_sampler)(denoiser, x_ve, sigmas, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours_vp, ours_ve, rtol=1e-7, atol=1e-7)


def test_zero_snr_timestep_samplers_start_from_pure_noise():
    """On a zero-SNR schedule the timestep grid starts at t = T - 1 where alpha = 0 and x_T is pure noise. A v
    network gives z0 = -v = MU and eps = x_T exactly there (nothing is divided by alpha = 0), so one DDIM step
    is sqrt(abar_next) MU + sqrt(1 - abar_next) x_T; an eps network has no finite z0 there."""
    schedule = ZERO_SNR
    plan = sampling_plan(schedule, "ddim", 10)
    assert int(plan.grid[0]) == 999 and float(schedule.alphas_cumprod[999]) == 0.0
    noise = _standard_noise()
    denoiser = Denoiser(GaussianNet(schedule, "v_prediction"), schedule, "v_prediction")
    one_step = get_sampler("ddim")(denoiser, noise, plan.grid[:2])
    abar = float(schedule.alphas_cumprod[int(plan.grid[1])])
    torch.testing.assert_close(one_step, math.sqrt(abar) * MU + math.sqrt(1 - abar) * noise)
    eps_denoiser = Denoiser(GaussianNet(schedule, "epsilon"), schedule, "epsilon")
    assert not torch.isfinite(get_sampler("ddim")(eps_denoiser, noise, plan.grid[:2])).all()


# ---------------------------------------------------------------- registry, plan and configs


def test_registry_names_and_errors():
    """Users' names resolve (aliases, case, a _karras suffix); an unknown one lists the known names."""
    from ldm.diffusion.samplers import SAMPLERS, sampler_options

    assert get_sampler("Euler_Ancestral") is get_sampler("euler_a") is SAMPLERS["euler_a"].fn
    assert get_sampler("pndm") is SAMPLERS["plms"].fn
    with pytest.raises(KeyError, match="dpmpp_2m_sde"):
        get_sampler("lms")
    assert sampler_options("ddim") == {"eta": 0.0}
    assert sampling_plan(SD, "dpmpp_2m_karras", 10).grid[0] == pytest.approx(SD.sigma_max)
    with pytest.raises(TypeError, match="eta"):
        sampling_plan(SD, "euler", 10, eta=1.0)
    with pytest.raises(ValueError, match="Karras"):
        sampling_plan(SD, "ddim", 10, karras=True)


def test_sigma_samplers_reject_infinite_sigma_and_report_steps():
    """An infinite first sigma (zero SNR taken literally) is refused with a pointer to the fix; the callback
    sees every step with x, the z0 estimate and the level."""
    denoiser = Denoiser(GaussianNet(ZERO_SNR, "v_prediction"), ZERO_SNR, "v_prediction")
    x = _standard_noise(80)
    with pytest.raises(ValueError, match="sigma_max"):
        get_sampler("euler")(denoiser, x, torch.tensor([float("inf"), 1.0, 0.0]))
    seen = []
    plan = sampling_plan(ZERO_SNR, "heun", 4)
    plan(denoiser, plan.initial_latents(x), callback=seen.append)
    assert [info["i"] for info in seen] == [0, 1, 2, 3]
    assert set(seen[0]) == {"i", "x", "sigma", "denoised"} and seen[0]["sigma"] == pytest.approx(
        4096, rel=1e-4
    )


def test_sampler_configs_build_and_run():
    """Every configs/sampler/*.yaml has the documented schema, builds a plan and samples the Gaussian."""
    from pathlib import Path

    from omegaconf import OmegaConf

    files = sorted((Path(__file__).parents[1] / "configs" / "sampler").glob("*.yaml"))
    assert {f.stem for f in files} >= {
        "ddpm",
        "ddim",
        "plms",
        "euler",
        "euler_a",
        "heun",
        "dpmpp_2m",
        "dpmpp_2m_sde",
    }
    denoiser = Denoiser(GaussianNet(SD, "epsilon"), SD, "epsilon")
    for f in files:
        cfg = OmegaConf.to_container(OmegaConf.load(f))
        assert set(cfg) == {"name", "steps", "spacing", "karras", "options"}, f.name
        plan = sampling_plan(
            SD, cfg["name"], 20, spacing=cfg["spacing"], karras=cfg["karras"], **cfg["options"]
        )
        x = _marginal(SD, plan.grid[0], plan.uses_timesteps, _standard_noise(2_000))
        out = plan(denoiser, x, generator=torch.Generator().manual_seed(0))
        assert abs(out.mean().item() - MU) < 0.1 and abs(out.std().item() / S - 1) < 0.25, f.name
