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

`SAMPLERS` is the one registry: a `SamplerSpec` per sampler holds everything the plan needs to know about it
(update rule, view, default spacing, grid rule, aliases). A new sampler is one function in
`sigma_samplers.py` or `timestep_samplers.py` and one `SamplerSpec` line here.
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
from ldm.diffusion.schedule import TIMESTEP_SPACINGS, NoiseSchedule, karras_sigmas
from ldm.diffusion.sigma_samplers import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from ldm.diffusion.timestep_samplers import sample_ddim, sample_ddpm, sample_plms

SamplerFn = Callable[..., Tensor]
# A grid rule: (schedule, steps, spacing, steps_offset, karras, set_alpha_to_one) -> (grid, init_noise_sigma),
# the grid and the scale of unit-variance starting noise that the sampler's diffusers scheduler builds.
GridRule = Callable[[NoiseSchedule, int, str, int, bool, bool], tuple[Tensor, float]]

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


# ---------------------------------------------------------------- grid rules


def _discrete_grid(
    schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int, final: int
) -> tuple[Tensor, float]:
    """The spaced integer timesteps and the chain's end: 0 is alphas_cumprod[0], -1 the clean end. x is VP,
    so unit-variance noise starts the chain unscaled (init_noise_sigma 1)."""
    timesteps = schedule.timesteps(steps, spacing, steps_offset)
    return torch.cat([timesteps, timesteps.new_full((1,), final)]), 1.0


def ddim_grid(
    schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int, karras: bool, set_alpha_to_one: bool
) -> tuple[Tensor, float]:
    """DDIMScheduler / PNDMScheduler.set_timesteps: spaced timesteps ending at alphas_cumprod[0]
    (`set_alpha_to_one=False`, SD's config) or at the clean level (`set_alpha_to_one=True`)."""
    return _discrete_grid(schedule, steps, spacing, steps_offset, -1 if set_alpha_to_one else 0)


def ddpm_grid(
    schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int, karras: bool, set_alpha_to_one: bool
) -> tuple[Tensor, float]:
    """DDPMScheduler.set_timesteps: spaced timesteps; DDPM always ends clean (its `self.one`)."""
    return _discrete_grid(schedule, steps, spacing, steps_offset, -1)


def euler_grid(
    schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int, karras: bool, set_alpha_to_one: bool
) -> tuple[Tensor, float]:
    """EulerDiscreteScheduler (and EulerAncestral, Heun).set_timesteps: sigmas of the spaced timesteps, or
    Karras sigmas between their ends, then 0; init_noise_sigma sqrt(sigma_max^2 + 1) with "leading"
    spacing and sigma_max otherwise (diffusers' rule)."""
    grid = schedule.sampling_sigmas(steps, spacing, steps_offset, karras)
    sigma_max = float(grid.max())
    return grid, math.sqrt(sigma_max**2 + 1) if spacing == "leading" else sigma_max


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


def dpm_solver_plan_grid(
    schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int, karras: bool, set_alpha_to_one: bool
) -> tuple[Tensor, float]:
    """`dpm_solver_grid`, and the VE equivalent sqrt(sigma_max^2 + 1) of the VP unit noise that diffusers'
    DPMSolverMultistepScheduler starts from (its init_noise_sigma is 1 in VP scaling)."""
    grid = dpm_solver_grid(schedule, steps, spacing, steps_offset, karras)
    return grid, math.sqrt(float(grid[0]) ** 2 + 1)


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler of the registry: its update rule `fn` (the common signature of `sigma_samplers` /
    `timestep_samplers`), the `view` it steps in ("sigma": VE-scaled x on a sigma grid; "timestep": VP-scaled
    x on integer timesteps), the timestep spacing its diffusers scheduler class defaults to (used when neither
    the caller nor the model's scheduler config names one; SD1.5's scheduler_config.json has none), the
    `grid` rule that builds its grid as that scheduler does, and other names users call it by."""

    name: str
    fn: SamplerFn
    view: str
    default_spacing: str
    grid: GridRule
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        grid_args = {"sigma": "sigmas", "timestep": "timesteps"}
        if self.view not in grid_args:
            raise ValueError(f"sampler {self.name!r}: view must be 'sigma' or 'timestep', got {self.view!r}")
        # The update rule's third argument names the grid it steps on; it must be the view's.
        third = list(inspect.signature(self.fn).parameters)[2:3]
        if third != [grid_args[self.view]]:
            raise ValueError(
                f"sampler {self.name!r}: a {self.view}-view rule takes {grid_args[self.view]!r} as its third "
                f"argument, {self.fn.__name__} takes {third}"
            )
        if self.default_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"sampler {self.name!r}: unknown default spacing {self.default_spacing!r}")

    @property
    def uses_timesteps(self) -> bool:
        """Whether the sampler steps on integer timesteps with VP-scaled x (else on sigmas, VE-scaled)."""
        return self.view == "timestep"

    @property
    def options(self) -> dict[str, Any]:
        """The sampler's own keyword options and their defaults (e.g. {"eta": 0.0} for ddim)."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.name not in _COMMON_ARGS}


# Adding a sampler: write its update rule in sigma_samplers.py or timestep_samplers.py, add one line here.
SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("ddpm", sample_ddpm, "timestep", "leading", ddpm_grid),
        SamplerSpec("ddim", sample_ddim, "timestep", "leading", ddim_grid),
        SamplerSpec("plms", sample_plms, "timestep", "leading", ddim_grid, aliases=("pndm",)),
        SamplerSpec("euler", sample_euler, "sigma", "linspace", euler_grid),
        SamplerSpec("euler_a", sample_euler_ancestral, "sigma", "linspace", euler_grid, ("euler_ancestral",)),
        SamplerSpec("heun", sample_heun, "sigma", "linspace", euler_grid),
        SamplerSpec("dpmpp_2m", sample_dpmpp_2m, "sigma", "linspace", dpm_solver_plan_grid),
        SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, "sigma", "linspace", dpm_solver_plan_grid),
    )
}


def canonical_sampler_name(name: str) -> tuple[str, bool]:
    """(registry name, karras) for a user-facing name: case-insensitive, aliases resolved, and a "_karras"
    suffix ("dpmpp_2m_karras", as A1111 spells it) read as the karras option."""
    key = name.strip().lower().replace("-", "_")
    karras = key.endswith("_karras")
    key = key.removesuffix("_karras")
    aliases = {alias: spec.name for spec in SAMPLERS.values() for alias in spec.aliases}
    key = aliases.get(key, key)
    if key not in SAMPLERS:
        known = sorted(set(SAMPLERS) | set(aliases))
        raise KeyError(
            f"unknown sampler {name!r}; known samplers: {', '.join(known)} (add _karras for Karras sigmas)"
        )
    return key, karras


def sampler_spec(name: str) -> SamplerSpec:
    """The registry entry for `name` (aliases and a "_karras" suffix allowed); a KeyError lists the names."""
    return SAMPLERS[canonical_sampler_name(name)[0]]


def get_sampler(name: str) -> SamplerFn:
    """The sampler function registered under `name` (aliases allowed); a KeyError lists the known names."""
    return sampler_spec(name).fn


def sampler_options(name: str) -> dict[str, Any]:
    """The sampler-specific keyword options of `name` and their defaults (e.g. {"eta": 0.0} for ddim)."""
    return sampler_spec(name).options


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a sampling loop needs, built by `sampling_plan`: the sampler's registry entry, its grid
    (sigmas, VE, descending to 0; or integer timesteps ending at 0 = alphas_cumprod[0] or -1 = clean), the
    scaling of unit-variance starting noise (diffusers' `init_noise_sigma`, expressed in this sampler's
    scaling) and the sampler's own options (eta, ...)."""

    spec: SamplerSpec
    schedule: NoiseSchedule
    grid: Tensor
    init_noise_sigma: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def sampler(self) -> str:
        """The sampler's registry name."""
        return self.spec.name

    @property
    def fn(self) -> SamplerFn:
        """The sampler's update rule."""
        return self.spec.fn

    @property
    def uses_timesteps(self) -> bool:
        """Whether the grid is integer timesteps (VP-scaled x) rather than sigmas (VE-scaled x)."""
        return self.spec.uses_timesteps

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
    spec = SAMPLERS[name]
    karras = karras or karras_suffix
    spacing = spacing or schedule.timestep_spacing or spec.default_spacing
    steps_offset = schedule.steps_offset if steps_offset is None else steps_offset
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(f"sampler {name!r} takes no option(s) {unknown}; its options are {spec.options}")
    if karras and spec.uses_timesteps:
        raise ValueError(f"{name} steps on integer timesteps; Karras sigmas need a sigma sampler")
    grid, init_noise_sigma = spec.grid(schedule, steps, spacing, steps_offset, karras, set_alpha_to_one)
    return SamplingPlan(spec, schedule, grid, init_noise_sigma, dict(options))


__all__ = [
    "SAMPLERS",
    "SamplerSpec",
    "SamplingPlan",
    "canonical_sampler_name",
    "ddim_grid",
    "ddpm_grid",
    "dpm_solver_grid",
    "dpm_solver_plan_grid",
    "euler_grid",
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
    "sampler_spec",
    "sampling_plan",
]
