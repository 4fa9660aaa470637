"""Samplers in the timestep (VP) view: x_t = alpha_t z0 + sigma_t eps on the discrete training timesteps.

Same signature as the sigma samplers, with a timestep grid in place of sigmas: `sample_*(denoiser, x,
timesteps, *, extra_args=None, callback=None, generator=None, noise_sampler=None, **options) -> x`, where
`denoiser.predict_at(x_t, t, **extra_args)` returns the (z0, eps) estimates (Denoiser's timestep view).
`timesteps` is descending integers and its last entry is where the chain ends: 0 for alphas_cumprod[0]
(diffusers' `set_alpha_to_one=False`, Stable Diffusion's DDIM/PNDM config), -1 for the clean end
(alphas_cumprod = 1, DDPM). x is VP-scaled throughout, so the result is the latent diffusers decodes.

Working on the discrete chain keeps these exact at zero terminal SNR (Lin et al. 2023): at t = T-1 alpha_t = 0
and x_t is pure noise, which the VE view cannot represent, while a v-prediction network still gives
z0 = -v and eps = x_t there.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ldm.diffusion.sampler_utils import (
    Callback,
    Generator,
    NoiseSampler,
    alpha_bars,
    default_noise_sampler,
    report,
)


def ddim_step(denoised: Tensor, eps: Tensor, alpha_bar_prev: float, std: float = 0.0) -> Tensor:
    """The deterministic part of a DDIM step, Song et al. 2021 eq. 12: sqrt(abar_prev) z0 + sqrt(1 - abar_prev
    - std^2) eps (clamped at 0 against rounding; the caller adds std * noise)."""
    return math.sqrt(alpha_bar_prev) * denoised + math.sqrt(max(1 - alpha_bar_prev - std**2, 0.0)) * eps


def sample_ddim(
    denoiser: Any,
    x: Tensor,
    timesteps: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM, Song et al. 2021 eq. 12 with sigma_t(eta) of eq. 16: eta = 0 is the deterministic sampler (a
    first-order solver of the probability-flow ODE), eta = 1 has DDPM's posterior variance (diffusers
    DDIMScheduler.step; noise drawn on every step when eta > 0, as there)."""
    extra_args = extra_args or {}
    ts, abars = alpha_bars(denoiser.schedule, timesteps)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in range(len(ts) - 1):
        t, a_t, a_prev = ts[i], abars[i], abars[i + 1]
        denoised, eps = denoiser.predict_at(x, t, **extra_args)
        # Posterior variance of q(x_prev | x_t, z0) (DDPM's beta-tilde), scaled by eta^2.
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * math.sqrt(max(variance, 0.0))
        x = ddim_step(denoised, eps, a_prev, std)
        if eta > 0:
            x = x + std * noise_sampler(t, ts[i + 1])
        report(callback, i=i, x=x, t=t, denoised=denoised)
    return x


def sample_ddpm(
    denoiser: Any,
    x: Tensor,
    timesteps: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral DDPM, Ho et al. 2020 Alg. 2 generalized to strided timesteps: sample the posterior
    q(x_prev | x_t, z0 = estimate) of eq. 6-7 with the "fixed_small" variance beta-tilde (diffusers
    DDPMScheduler.step: variance clamped at 1e-20, and no noise drawn when t = 0)."""
    extra_args = extra_args or {}
    ts, abars = alpha_bars(denoiser.schedule, timesteps)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in range(len(ts) - 1):
        t, a_t, a_prev = ts[i], abars[i], abars[i + 1]
        denoised, _ = denoiser.predict_at(x, t, **extra_args)
        alpha_step = a_t / a_prev  # alpha of the strided step (1 - its beta)
        beta_step = 1 - alpha_step
        # Posterior mean, Ho et al. 2020 eq. 7.
        x = (math.sqrt(a_prev) * beta_step / (1 - a_t)) * denoised + (
            math.sqrt(alpha_step) * (1 - a_prev) / (1 - a_t)
        ) * x
        if t > 0:
            variance = max((1 - a_prev) / (1 - a_t) * beta_step, 1e-20)
            x = x + math.sqrt(variance) * noise_sampler(t, ts[i + 1])
        report(callback, i=i, x=x, t=t, denoised=denoised)
    return x


def _plms_combination(history: list[Tensor]) -> Tensor:
    """Adams-Bashforth combination of the last eps estimates or network outputs (newest last), of the order
    the history allows: 2nd order (3, -1)/2, 3rd (23, -16, 5)/12, 4th (55, -59, 37, -9)/24 (Liu et al.
    2022 eq. 12)."""
    e = history[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24


def _transfer(x: Tensor, eps: Tensor, a_t: float, a_prev: float) -> Tensor:
    """PNDM's transfer function phi(x_t, eps, t, t_prev), Liu et al. 2022 eq. 9, written in its equivalent
    DDIM form sqrt(a_prev) z0(eps) + sqrt(1 - a_prev) eps, z0(eps) = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    denoised = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return ddim_step(denoised, eps, a_prev)


def sample_plms(
    denoiser: Any,
    x: Tensor,
    timesteps: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generator = None,
    noise_sampler: NoiseSampler | None = None,
    combine: str = "eps",
) -> Tensor:
    """Pseudo linear multistep (PLMS), Liu et al. 2022 ("Pseudo Numerical Methods for Diffusion Models on
    Manifolds", eq. 9 and 12), as diffusers' PNDMScheduler(skip_prk_steps=True) and CompVis `plms.py`: the
    first step is a pseudo improved-Euler step (one extra evaluation at the DDIM-predicted point, averaged),
    then Adams-Bashforth of order 2, 3, then 4 through the DDIM transfer. The corrector evaluation is not kept
    in the history, as in both references.

    `combine="eps"` extrapolates eps estimates (the paper's method; independent of the parameterization).
    `combine="model_output"` extrapolates the raw network outputs and converts the result at the current x_t,
    which is what diffusers' PNDMScheduler does for v-prediction (identical for eps networks).
    At a zero-SNR start (alpha_t = 0) no eps but x_t itself is consistent with x_t, so with "eps" the first
    step there is a plain DDIM step; diffusers' PNDM does not support such schedules."""
    if combine not in ("eps", "model_output"):
        raise ValueError(f"combine must be 'eps' or 'model_output', got {combine!r}")
    extra_args = extra_args or {}
    ts, abars = alpha_bars(denoiser.schedule, timesteps)

    def evaluate(x_t: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """(z0, eps, quantity to extrapolate) from one network call."""
        if combine == "eps":
            denoised, eps = denoiser.predict_at(x_t, t, **extra_args)
            return denoised, eps, eps
        output = denoiser.net_output_at(x_t, t, **extra_args)
        denoised, eps = denoiser.convert_at(output, x_t, t)
        return denoised, eps, output

    def transfer(x_t: Tensor, quantity: Tensor, t: int, a_t: float, a_prev: float) -> Tensor:
        """PNDM eq. 9 from x_t with an extrapolated eps or network output."""
        if combine == "eps":
            return _transfer(x_t, quantity, a_t, a_prev)
        return ddim_step(*denoiser.convert_at(quantity, x_t, t), a_prev)

    history: list[Tensor] = []
    last = len(ts) - 2
    for i in range(len(ts) - 1):
        t, a_t, a_prev = ts[i], abars[i], abars[i + 1]
        denoised, eps, quantity = evaluate(x, t)
        history = [*history[-3:], quantity]
        if a_t == 0 and combine == "eps":
            x = ddim_step(denoised, eps, a_prev)
        elif len(history) == 1 and i < last:
            # Pseudo improved Euler: the quantity at the DDIM-predicted next point, averaged with this one.
            x_pred = ddim_step(denoised, eps, a_prev)
            _, _, quantity_next = evaluate(x_pred, ts[i + 1])
            x = transfer(x, (quantity + quantity_next) / 2, t, a_t, a_prev)
        else:
            x = transfer(x, _plms_combination(history), t, a_t, a_prev)
        report(callback, i=i, x=x, t=t, denoised=denoised)
    return x
