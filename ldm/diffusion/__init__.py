"""Diffusion math that holds no weights: schedules, parameterizations, samplers, guidance (DESIGN.md)."""

from ldm.diffusion.denoiser import (
    PREDICTION_TYPES,
    Denoiser,
    append_dims,
    canonical_prediction_type,
    eps_to_v,
    eps_to_x0,
    to_eps,
    to_x0,
    training_target,
    v_to_eps,
    v_to_x0,
    x0_to_eps,
    x0_to_v,
)
from ldm.diffusion.guidance import cfg_denoiser
from ldm.diffusion.samplers import SAMPLERS, SamplerSpec, SamplingPlan, get_sampler, sampling_plan
from ldm.diffusion.schedule import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    NoiseSchedule,
    karras_sigmas,
    sigma_to_vp,
)

__all__ = [
    "SAMPLERS",
    "SamplerSpec",
    "SamplingPlan",
    "cfg_denoiser",
    "get_sampler",
    "sampling_plan",
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "Denoiser",
    "NoiseSchedule",
    "append_dims",
    "canonical_prediction_type",
    "eps_to_v",
    "eps_to_x0",
    "karras_sigmas",
    "sigma_to_vp",
    "to_eps",
    "to_x0",
    "training_target",
    "v_to_eps",
    "v_to_x0",
    "x0_to_eps",
    "x0_to_v",
]
