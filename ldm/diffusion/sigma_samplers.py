"""Samplers in the sigma (VE) view: x = z0 + sigma eps, stepping down a grid of noise levels.

Each is a pure function `sample_*(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
noise_sampler=None, **options) -> x` over the Denoiser's sigma view `denoiser(x, sigma, **extra_args)` = z0
estimate (k-diffusion `sampling.py`; NVlabs/edm `edm_sampler`). `sigmas` is descending and ends in 0 (or a
small sigma); the result is VE-scaled at the last sigma, which at sigma = 0 is the latent itself.

The update rules are the ones diffusers' EulerDiscrete / EulerAncestralDiscrete / HeunDiscrete /
DPMSolverMultistep schedulers apply, rewritten in VE scaling (their DPM-Solver works on VP x = x_VE / sqrt(1 +
sigma^2); the algebra is identical), and random noise is drawn in the same order, one `randn(x.shape)` per
step, so a shared generator gives the same samples.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.sampler_utils import (
    Callback,
    Generator,
    NoiseSampler,
    batch_level,
    default_noise_sampler,
    report,
    sigma_levels,
)


def get_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part down to sigma_down and fresh noise of std
    sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion `get_ancestral_step`; eta = 1 is
    the DDPM-like ancestral step, the value diffusers' EulerAncestralDiscreteScheduler uses)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


def sample_euler(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, Karras et al. 2022
    Alg. 1 without churn (k-diffusion `sample_euler`; diffusers EulerDiscreteScheduler, s_churn = 0).
    Deterministic: `generator` and `noise_sampler` are unused."""
    extra_args = extra_args or {}
    levels = sigma_levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = denoiser(x, batch_level(sigma, x), **extra_args)
        d = (x - denoised) / sigma
        # x + d (sigma_next - sigma) written as denoised + d sigma_next: the same number without cancelling
        # two large terms when sigma is large (zero-SNR grids start at sigma ~ 4096).
        x = denoised + d * sigma_next
        report(callback, i=i, x=x, sigma=sigma, denoised=denoised)
    return x


def sample_euler_ancestral(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up (k-diffusion
    `sample_euler_ancestral`; diffusers EulerAncestralDiscreteScheduler at eta = 1). Like diffusers, noise
    is drawn on every step, the last included (where sigma_up = 0), so a shared generator stays in step."""
    extra_args = extra_args or {}
    levels = sigma_levels(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = denoiser(x, batch_level(sigma, x), **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = denoised + d * sigma_down  # = x + d (sigma_down - sigma), see sample_euler
        x = x + noise_sampler(sigma, sigma_next) * (sigma_up * s_noise)
        report(callback, i=i, x=x, sigma=sigma, denoised=denoised)
    return x


def sample_heun(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Heun's 2nd-order method, Karras et al. 2022 Alg. 2 (deterministic, S_churn = 0): an Euler predictor,
    then the trapezoid of the slopes at both ends; the last step into sigma = 0 stays Euler because the slope
    there is undefined (k-diffusion `sample_heun`; diffusers HeunDiscreteScheduler). Two evaluations a
    step."""
    extra_args = extra_args or {}
    levels = sigma_levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = denoiser(x, batch_level(sigma, x), **extra_args)
        d = (x - denoised) / sigma
        x_pred = denoised + d * sigma_next  # the Euler step x + d (sigma_next - sigma), see sample_euler
        if sigma_next == 0:
            x = x_pred
        else:
            denoised_next = denoiser(x_pred, batch_level(sigma_next, x), **extra_args)
            d_next = (x_pred - denoised_next) / sigma_next
            # x + (d + d_next) / 2 * dt, as a correction to the predictor (no cancellation at large sigma).
            x = x_pred + (d_next - d) * ((sigma_next - sigma) / 2)
        report(callback, i=i, x=x, sigma=sigma, denoised=denoised)
    return x


def sample_dpmpp_2m(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++", Alg. 2): a multistep exponential integrator in
    log-SNR time lambda = -log sigma on the data prediction, with the linear extrapolation
    D = (1 + 1/2r) D_i - (1/2r) D_{i-1}, r = h_{i-1} / h_i. The first step (no history) and a step into
    sigma = 0 are first order (DPM-Solver++(1) = DDIM), which is what diffusers' DPMSolverMultistepScheduler
    (solver_order 2, midpoint, final_sigmas_type "zero") and k-diffusion `sample_dpmpp_2m` both do."""
    extra_args = extra_args or {}
    levels = sigma_levels(sigmas)
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = denoiser(x, batch_level(sigma, x), **extra_args)
        if sigma_next == 0:
            # The first-order update's limit: sigma_next / sigma -> 0 and -expm1(-h) -> 1.
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        report(callback, i=i, x=x, sigma=sigma, denoised=denoised)
    return x


def sample_dpmpp_2m_sde(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE, Lu et al. 2022 ("DPM-Solver++", Sec. 4 / App. B, the SDE variant) with the
    midpoint 2nd-order term, as diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    and k-diffusion `sample_dpmpp_2m_sde` (eta scales the injected noise; eta = 1 is diffusers'). Noise is
    drawn on every step in float32 or wider, as diffusers does; first and final steps are first order."""
    extra_args = extra_args or {}
    levels = sigma_levels(sigmas)
    noise_dtype = torch.promote_types(x.dtype, torch.float32)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator, dtype=noise_dtype)
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        denoised = denoiser(x, batch_level(sigma, x), **extra_args)
        noise = noise_sampler(sigma, sigma_next)
        if sigma_next == 0:
            x = denoised  # every coefficient but the data term vanishes at sigma_next = 0
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            data_coeff = -math.expm1(-h - eta_h)  # 1 - exp(-2h) at eta = 1
            x = (sigma_next / sigma * math.exp(-eta_h)) * x + data_coeff * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + (0.5 * data_coeff / r) * (denoised - old_denoised)
            x = x + noise * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
            h_last = h
        old_denoised = denoised
        report(callback, i=i, x=x, sigma=sigma, denoised=denoised)
    return x
