"""Sampler registry and the plan that turns (schedule, sampler name, steps, options) into a runnable loop.

Samplers are pure functions over a denoiser (DESIGN.md pattern 2), one signature for all:

    fn(denoiser, x, grid, *, extra_args=None, callback=None, generator=None, noise_sampler=None, **options)

`grid` is a sigma grid for the sigma-view samplers (ldm.diffusion.sigma_samplers: euler, euler_a, heun,
dpmpp_2m, dpmpp_2m_sde; x is VE-scaled) and a timestep grid for the discrete ones
(ldm.diffusion.timestep_samplers: ddpm, ddim, plms; x is VP-scaled). `sampling_plan` builds the grid exactly
as the matching diffusers scheduler's `set_timesteps` does, together with `init_noise_sigma`, so that

    plan = sampling_plan(schedule, "euler_a", 30)
    latents = plan(denoiser, plan.initial_latents(noise), extra_args={"context": c}, generator=g)

reproduces StableDiffusionPipeline with that scheduler from the same unit-variance `noise` and generator. Each
sampler returns x in the scaling diffusers returns it (VE at sigma = 0 equals the latent; DDIM/PLMS end in VP
at alphas_cumprod[0]), so `latents` is what diffusers would decode: no conversion follows.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldm.diffusion.sampler_utils import Callback, Generator, NoiseSampler
from ldm.diffusion.schedule import NoiseSchedule, karras_sigmas
from ldm.diffusion.sigma_samplers import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from ldm.diffusion.timestep_samplers import sample_ddim, sample_ddpm, sample_plms

SamplerFn = Callable[..., Tensor]

SAMPLERS: dict[str, SamplerFn] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
# Samplers that step on integer timesteps with VP-scaled x; the others step on sigmas with VE-scaled x.
TIMESTEP_SAMPLERS = frozenset({"ddpm", "ddim", "plms"})
_ALIASES = {"euler_ancestral": "euler_a", "pndm": "plms"}
# The DPM-Solver family follows DPMSolverMultistepScheduler's own grid rules (see `dpm_solver_grid`).
_DPM_SOLVERS = frozenset({"dpmpp_2m", "dpmpp_2m_sde"})
# The timestep spacing each sampler's diffusers scheduler class defaults to, used when neither the caller
# nor the model's scheduler config names one (SD1.5's scheduler_config.json has no timestep_spacing).
DEFAULT_SPACING = {
    "ddpm": "leading", "ddim": "leading", "plms": "leading",
    "euler": "linspace", "euler_a": "linspace", "heun": "linspace",
    "dpmpp_2m": "linspace", "dpmpp_2m_sde": "linspace",
}  # fmt: skip


def canonical_sampler_name(name: str) -> tuple[str, bool]:
    """(registry name, karras) for a user-facing name: case-insensitive, aliases resolved, and a "_karras"
    suffix ("dpmpp_2m_karras", as A1111 spells it) read as the karras option."""
    key = name.strip().lower().replace("-", "_")
    karras = key.endswith("_karras")
    key = key.removesuffix("_karras")
    key = _ALIASES.get(key, key)
    if key not in SAMPLERS:
        known = sorted(set(SAMPLERS) | set(_ALIASES))
        raise KeyError(
            f"unknown sampler {name!r}; known samplers: {', '.join(known)} (add _karras for Karras sigmas)"
        )
    return key, karras


def get_sampler(name: str) -> SamplerFn:
    """The sampler function registered under `name` (aliases allowed); a KeyError lists the known names."""
    return SAMPLERS[canonical_sampler_name(name)[0]]


def dpm_solver_grid(
    schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int, karras: bool
) -> Tensor:
    """Sigmas (with the final 0) of diffusers' DPMSolverMultistepScheduler.set_timesteps, whose rules differ
    from DDIM's: "leading" spaces steps + 1 points by T // (steps + 1) and drops t = 0, "linspace" likewise
    over [0, T-1]; Karras sigmas (Karras et al. 2022 eq. 5) span the whole training table, not the spaced
    grid. (diffusers also rounds the Karras timesteps the network sees; our Denoiser does not round.)"""
    T = schedule.num_train_timesteps
    if not 0 < steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if karras:
        sigmas = karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max).to(schedule.dtype)
    else:
        # numpy as in diffusers, so the rounding ties land on the same integers.
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + steps_offset
        elif spacing == "trailing":
            ts = np.arange(T, 0, -T / steps).round() - 1
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}")
        timesteps = torch.from_numpy(ts.astype(np.float64).copy()).to(schedule.device)
        sigmas = schedule.t_to_sigma(timesteps, interpolation="linear")
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a sampling loop needs, built by `sampling_plan`: the sampler, its grid (sigmas, VE,
    descending to 0; or integer timesteps ending at 0 = alphas_cumprod[0] or -1 = clean), the scaling of
    unit-variance starting noise (diffusers' `init_noise_sigma`, expressed in this sampler's scaling) and the
    sampler's own options (eta, ...)."""

    sampler: str
    fn: SamplerFn
    schedule: NoiseSchedule
    grid: Tensor
    uses_timesteps: bool
    init_noise_sigma: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """Number of sampler steps (grid intervals; Heun and the PLMS start use two evaluations for one)."""
        return len(self.grid) - 1

    def initial_latents(self, noise: Tensor) -> Tensor:
        """x at the first grid level from unit-variance noise: noise * init_noise_sigma, as diffusers'
        `prepare_latents` (so a pipeline fed the same `latents` starts from the same point)."""
        return noise * self.init_noise_sigma

    def add_noise(self, z0: Tensor, noise: Tensor) -> Tensor:
        """Noise a clean latent to the first grid level (img2img / inpainting start): z0 + sigma eps for the
        sigma samplers, alpha_t z0 + sigma_t eps for the timestep ones (diffusers' `scheduler.add_noise`)."""
        if self.uses_timesteps:
            t = torch.full((z0.shape[0],), int(self.grid[0]), dtype=torch.long)
            return self.schedule.add_noise(z0, noise, t)
        return z0 + noise * float(self.grid[0])

    def truncate(self, strength: float) -> SamplingPlan:
        """The plan for img2img at `strength` in (0, 1]: skip the first steps - int(steps * strength) grid
        intervals, as diffusers' img2img `get_timesteps` (start the loop from `add_noise`, not from
        `initial_latents`)."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        start = self.steps - min(int(self.steps * strength), self.steps)
        if start >= self.steps:
            raise ValueError(f"strength {strength} leaves no step of {self.steps} to run")
        return replace(self, grid=self.grid[start:])

    def __call__(
        self,
        denoiser: Any,
        x: Tensor,
        *,
        extra_args: dict[str, Any] | None = None,
        callback: Callback | None = None,
        generator: Generator = None,
        noise_sampler: NoiseSampler | None = None,
    ) -> Tensor:
        """Run the sampler from x (already at the first grid level) and return the final latent."""
        return self.fn(
            denoiser,
            x,
            self.grid,
            extra_args=extra_args,
            callback=callback,
            generator=generator,
            noise_sampler=noise_sampler,
            **self.options,
        )


_COMMON_ARGS = (
    "denoiser",
    "x",
    "sigmas",
    "timesteps",
    "extra_args",
    "callback",
    "generator",
    "noise_sampler",
)


def sampler_options(name: str) -> dict[str, Any]:
    """The sampler-specific keyword options of `name` and their defaults (e.g. {"eta": 0.0} for ddim)."""
    params = inspect.signature(get_sampler(name)).parameters.values()
    return {p.name: p.default for p in params if p.name not in _COMMON_ARGS}


def sampling_plan(
    schedule: NoiseSchedule,
    sampler: str = "euler",
    steps: int = 30,
    *,
    spacing: str | None = None,
    steps_offset: int | None = None,
    karras: bool = False,
    set_alpha_to_one: bool = False,
    **options: Any,
) -> SamplingPlan:
    """Grid and initial-noise scale for `sampler` with `steps` steps on `schedule`, equal to what the matching
    diffusers scheduler's `set_timesteps` / `init_noise_sigma` give (DDIM / DDPM / PNDM(skip_prk_steps),
    EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete, DPMSolverMultistep with dpmsolver++ or
    sde-dpmsolver++, order 2). `spacing` and `steps_offset` default to the schedule's (taken from the
    model's scheduler config); `karras` (or a "_karras" name suffix) uses Karras et al. 2022 sigmas (sigma
    samplers only); `set_alpha_to_one` ends DDIM / PLMS at the clean level instead of alphas_cumprod[0] (DDPM
    always ends clean). Remaining keywords are the sampler's options (`sampler_options(name)`), e.g. eta.

    init_noise_sigma is the factor on unit-variance noise in the sampler's own scaling: 1 for the timestep
    samplers (VP); for Euler / Euler a / Heun diffusers' rule, sqrt(sigma_max^2 + 1) with "leading" spacing
    and sigma_max otherwise; for DPM-Solver, whose diffusers scheduler starts from VP noise * 1, the VE
    equivalent sqrt(sigma_max^2 + 1). Under zero terminal SNR the sigma samplers start from the finite
    substitute sigma_max (~4096), as diffusers does; the timestep samplers start exactly at alpha_t = 0.

    One deliberate difference: diffusers' DDIM and PNDM step from t to t - T // steps instead of to the next
    grid timestep (huggingface/diffusers#12633, #11347; fixed for DDPM in #9384). Both agree for "leading"
    spacing and whenever steps divides T; elsewhere we step to the next grid timestep, as DDIM defines it.
    """
    name, karras_suffix = canonical_sampler_name(sampler)
    karras = karras or karras_suffix
    spacing = spacing or schedule.timestep_spacing or DEFAULT_SPACING[name]
    steps_offset = schedule.steps_offset if steps_offset is None else steps_offset
    fn = SAMPLERS[name]
    known = sampler_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"sampler {name!r} takes no option(s) {unknown}; its options are {known}")

    if name in TIMESTEP_SAMPLERS:
        if karras:
            raise ValueError(f"{name} steps on integer timesteps; Karras sigmas need a sigma sampler")
        timesteps = schedule.timesteps(steps, spacing, steps_offset)
        # 0: end at alphas_cumprod[0] (diffusers' set_alpha_to_one=False); -1: the clean end, alpha = 1.
        final = -1 if (name == "ddpm" or set_alpha_to_one) else 0
        grid = torch.cat([timesteps, timesteps.new_full((1,), final)])
        init_noise_sigma = 1.0
    elif name in _DPM_SOLVERS:
        grid = dpm_solver_grid(schedule, steps, spacing, steps_offset, karras)
        init_noise_sigma = math.sqrt(float(grid[0]) ** 2 + 1)
    else:
        grid = schedule.sampling_sigmas(steps, spacing, steps_offset, karras)
        sigma_max = float(grid.max())
        init_noise_sigma = math.sqrt(sigma_max**2 + 1) if spacing == "leading" else sigma_max
    return SamplingPlan(name, fn, schedule, grid, name in TIMESTEP_SAMPLERS, init_noise_sigma, dict(options))


__all__ = [
    "SAMPLERS",
    "TIMESTEP_SAMPLERS",
    "SamplingPlan",
    "canonical_sampler_name",
    "dpm_solver_grid",
    "get_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_plms",
    "sampler_options",
    "sampling_plan",
]
