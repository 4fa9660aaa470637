"""The sampler registry is one table: each `SamplerSpec` carries a sampler's update rule, view, default
spacing, grid rule and aliases, and a new sampler needs nothing but its function and one entry."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.samplers import (
    SAMPLERS,
    SamplerSpec,
    canonical_sampler_name,
    euler_grid,
    get_sampler,
    sampler_options,
    sampling_plan,
)
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.sigma_samplers import sample_euler
from ldm.diffusion.timestep_samplers import sample_ddim

# timestep_spacing unset, as SD1.5's scheduler_config.json: each sampler falls back to its own default.
UNSET = NoiseSchedule(timestep_spacing=None)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_entry_builds_a_grid_of_its_view(name):
    spec = SAMPLERS[name]
    assert spec.name == name and get_sampler(name) is spec.fn
    assert all(canonical_sampler_name(alias) == (name, False) for alias in spec.aliases)
    plan = sampling_plan(UNSET, name, 10)
    assert plan.spec is spec and plan.steps == 10 and plan.uses_timesteps == spec.uses_timesteps
    if spec.view == "timestep":
        assert not plan.grid.is_floating_point() and plan.grid[-1] in (0, -1) and plan.init_noise_sigma == 1
    else:
        assert plan.grid.is_floating_point() and plan.grid[-1] == 0 and plan.init_noise_sigma >= plan.grid[0]
    assert (plan.grid[:-1] >= plan.grid[1:]).all()


def test_default_spacing_comes_from_the_entry():
    """SD1.5's scheduler config names no spacing: DDIM then spaces "leading" (first timestep 901 with
    offset 1), Euler "linspace" (starting at t = 999), as their diffusers classes default to."""
    assert SAMPLERS["ddim"].default_spacing == "leading" and SAMPLERS["euler"].default_spacing == "linspace"
    assert int(sampling_plan(UNSET, "ddim", 10).grid[0]) == 901
    assert float(sampling_plan(UNSET, "euler", 10).grid[0]) == pytest.approx(UNSET.sigma_max, rel=1e-6)


def test_a_new_sampler_is_one_entry(monkeypatch):
    """Registering a spec is all it takes: its name and aliases resolve, its default spacing and grid rule
    build the plan, its options come from its function's signature."""
    spec = SamplerSpec("euler_leading", sample_euler, "sigma", "leading", euler_grid, aliases=("el",))
    monkeypatch.setitem(SAMPLERS, spec.name, spec)
    plan = sampling_plan(UNSET, "EL", 10)
    assert plan.sampler == "euler_leading" and plan.fn is sample_euler
    torch.testing.assert_close(plan.grid, UNSET.sampling_sigmas(10, "leading"))
    # diffusers' Euler rule for "leading" spacing: sqrt(sigma_max^2 + 1).
    assert plan.init_noise_sigma == pytest.approx(math.sqrt(float(plan.grid[0]) ** 2 + 1))
    assert sampler_options("el") == {}
    plan = sampling_plan(UNSET, "el_karras", 10)
    assert plan.grid[0] == pytest.approx(float(UNSET.sampling_sigmas(10, "leading")[0]))


def test_an_entry_must_match_its_view():
    """A timestep-view rule registered as a sigma sampler (or the reverse) fails at registration."""
    with pytest.raises(ValueError, match="sigmas"):
        SamplerSpec("bad", sample_ddim, "sigma", "leading", euler_grid)
    with pytest.raises(ValueError, match="view"):
        SamplerSpec("bad", sample_euler, "ve", "leading", euler_grid)
    with pytest.raises(ValueError, match="spacing"):
        SamplerSpec("bad", sample_euler, "sigma", "uniform", euler_grid)
