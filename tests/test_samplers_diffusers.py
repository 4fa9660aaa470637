"""Scheduler-level parity with diffusers: our samplers vs diffusers' scheduler loops on a fixed toy network.

The diffusers side runs the loop StableDiffusionPipeline runs (latents * init_noise_sigma, scale_model_input,
network, step with the pipeline's extra step kwargs); ours runs `sampling_plan(...)` on the same unit-variance
noise and an identically seeded generator. Final latents must agree to ~1e-5 relative (float32 arithmetic on
both sides; diffusers builds its tables in float32, we in float64).
"""

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers import sampling_plan
from ldm.diffusion.schedule import NoiseSchedule

SHAPE = (2, 4, 6, 6)
STEPS = 10  # divides T = 1000: diffusers' DDIM / PNDM step to t - T // steps, the next grid entry then


class ToyNet:
    """A fixed random network with a nonlinear dependence on x and t: tanh of a random channel mixing plus
    timestep-dependent terms. `round_t` makes it see round(t), like diffusers' Karras DPM-Solver timesteps."""

    def __init__(self, round_t: bool = False) -> None:
        g = torch.Generator().manual_seed(1234)
        self.weight = torch.randn(4, 4, generator=g) / 2
        self.bias = torch.randn(4, 1, 1, generator=g) / 4
        self.round_t = round_t
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context=None) -> torch.Tensor:
        """Output shaped like x; t may be 0-d (diffusers) or (B,) (ours)."""
        self.calls += 1
        t = torch.as_tensor(t, device=x.device).to(torch.float64)
        t = (t.round() if self.round_t else t).reshape(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", self.weight.to(x.dtype), x) + self.bias.to(x.dtype)
        out = 0.6 * torch.tanh(h) + 0.3 * x * torch.cos(t / 150) + 0.2 * torch.sin(t / 90)
        return out.to(x.dtype)


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "plms": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "dpmpp_2m_sde": DPMSolverMultistepScheduler,
}


def _diffusers_scheduler(name: str, schedule: NoiseSchedule, prediction_type: str, karras: bool):
    """The diffusers scheduler matching `name`, configured from our schedule like a SD scheduler_config."""
    config = schedule.to_diffusers_config(prediction_type)
    if name == "plms":
        config["skip_prk_steps"] = True
    if name.startswith("dpmpp"):
        config.update(
            algorithm_type="sde-dpmsolver++" if name.endswith("sde") else "dpmsolver++", solver_order=2
        )
    if karras:
        config["use_karras_sigmas"] = True
    return SCHEDULERS[name].from_config(config)


def _run_diffusers(scheduler, net, noise, steps, generator, eta):
    """StableDiffusionPipeline's denoising loop (without guidance), step kwargs chosen by signature."""
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {"generator": generator} if "generator" in accepted else {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(net(model_input, t), t, latents, **kwargs).prev_sample
    return latents


def _compare(name, prediction_type, spacing, karras=False, zero_snr=False, eta=0.0, steps=STEPS):
    """Run both sides and return (ours, theirs, number of network calls each)."""
    schedule = NoiseSchedule(rescale_zero_terminal_snr=zero_snr, timestep_spacing=spacing)
    net = ToyNet(round_t=karras and name.startswith("dpmpp"))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    scheduler = _diffusers_scheduler(name, schedule, prediction_type, karras)
    theirs = _run_diffusers(scheduler, net, noise, steps, torch.Generator().manual_seed(99), eta)
    their_calls, net.calls = net.calls, 0
    options = {"eta": eta} if name == "ddim" else {}
    if name == "plms":
        options["combine"] = "model_output"  # diffusers extrapolates raw (v) outputs
    plan = sampling_plan(schedule, name, steps, karras=karras, **options)
    denoiser = Denoiser(net, schedule, prediction_type)
    ours = plan(denoiser, plan.initial_latents(noise), generator=torch.Generator().manual_seed(99))
    return ours, theirs, net.calls, their_calls


def _assert_parity(ours, theirs, rtol=1e-5):
    """Relative L2 error and elementwise closeness."""
    assert torch.isfinite(ours).all()
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < rtol, f"relative error {rel:.2e}"
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


CASES = [
    (name, pred, spacing)
    for name in SCHEDULERS
    for pred in ("epsilon", "v_prediction")
    for spacing in ("leading", "trailing")
]


@pytest.mark.parametrize(("name", "prediction_type", "spacing"), CASES)
def test_matches_diffusers(name, prediction_type, spacing):
    """Every sampler equals its diffusers scheduler for eps and v networks, leading and trailing spacing, and
    calls the network as often."""
    ours, theirs, calls, their_calls = _compare(name, prediction_type, spacing)
    _assert_parity(ours, theirs)
    assert calls == their_calls


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde"])
def test_karras_matches_diffusers(name):
    """use_karras_sigmas=True. diffusers' DPM-Solver rounds Karras timesteps for the network; the toy network
    rounds t itself there so both sides see the same input."""
    ours, theirs, _, _ = _compare(name, "epsilon", "leading", karras=True, steps=12)
    _assert_parity(ours, theirs)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde"])
def test_zero_terminal_snr_matches_diffusers(name):
    """Zero-terminal-SNR schedule with trailing spacing and a v network (Lin et al. 2023): the timestep
    samplers start exactly at alpha = 0, the sigma samplers at diffusers' 2**-24 substitute."""
    ours, theirs, _, _ = _compare(name, "v_prediction", "trailing", zero_snr=True)
    _assert_parity(ours, theirs)


def test_ddim_eta_matches_diffusers():
    """DDIM with eta = 1 draws the same noise from the same generator."""
    ours, theirs, _, _ = _compare("ddim", "epsilon", "leading", eta=1.0)
    _assert_parity(ours, theirs)


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "dpmpp_2m", "ddim", "plms"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_grid_and_init_noise_match_diffusers(name, spacing):
    """The plan's grid is the scheduler's (sigmas, or timesteps plus the final target) and its
    init_noise_sigma is diffusers' (converted to VE for DPM-Solver, which starts from VP noise * 1)."""
    steps = 7
    schedule = NoiseSchedule(timestep_spacing=spacing)
    scheduler = _diffusers_scheduler(name, schedule, "epsilon", karras=False)
    scheduler.set_timesteps(steps)
    plan = sampling_plan(schedule, name, steps)
    if plan.uses_timesteps:
        ts = (
            scheduler.timesteps
            if name == "ddim"
            else torch.cat([scheduler.timesteps[:1], scheduler.timesteps[2:]])
        )
        assert plan.grid[:-1].tolist() == ts.tolist()
        assert plan.grid[-1].item() == 0 and plan.init_noise_sigma == scheduler.init_noise_sigma == 1.0
        return
    sigmas = scheduler.sigmas if name != "heun" else torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]])
    torch.testing.assert_close(plan.grid.float(), sigmas.float(), rtol=2e-5, atol=0)
    expected = float(scheduler.init_noise_sigma)
    if name == "dpmpp_2m":
        expected = math.sqrt(float(sigmas[0]) ** 2 + 1) * expected
    assert plan.init_noise_sigma == pytest.approx(expected, rel=2e-6)


def test_randn_matches_diffusers_randn_tensor():
    """Noise is drawn as diffusers' randn_tensor draws it, for one generator and for one per batch item."""
    from diffusers.utils.torch_utils import randn_tensor

    from ldm.diffusion.sampler_utils import randn

    for make in (
        lambda: torch.Generator().manual_seed(5),
        lambda: [torch.Generator().manual_seed(i) for i in (3, 4)],
    ):
        torch.testing.assert_close(
            randn(SHAPE, make()), randn_tensor(SHAPE, generator=make()), rtol=0, atol=0
        )


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "heun", "dpmpp_2m"])
def test_img2img_truncation_matches_diffusers(name):
    """`plan.truncate(strength)` + `plan.add_noise` reproduce StableDiffusionImg2ImgPipeline's get_timesteps,
    set_begin_index and scheduler.add_noise."""
    steps, strength = 10, 0.6
    schedule = NoiseSchedule()
    net = ToyNet()
    g = torch.Generator().manual_seed(11)
    z0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    scheduler = _diffusers_scheduler(name, schedule, "epsilon", karras=False)
    scheduler.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    latents = scheduler.add_noise(z0, noise, timesteps[:1].repeat(SHAPE[0]))
    generator = torch.Generator().manual_seed(99)
    for t in timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        kwargs = (
            {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        )
        latents = scheduler.step(net(model_input, t), t, latents, **kwargs).prev_sample
    plan = sampling_plan(schedule, name, steps).truncate(strength)
    assert plan.steps == int(steps * strength)
    ours = plan(
        Denoiser(net, schedule, "epsilon"),
        plan.add_noise(z0, noise),
        generator=torch.Generator().manual_seed(99),
    )
    _assert_parity(ours, latents)
