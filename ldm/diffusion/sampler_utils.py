"""Small pieces shared by the samplers: noise drawn as diffusers draws it, per-step callbacks, grid checks.

Kept apart from the samplers so that `sigma_samplers.py` (VE, k-diffusion style) and `timestep_samplers.py`
(VP, discrete DDPM/DDIM style) read as the update rules and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.schedule import NoiseSchedule

# A generator, one per batch item (diffusers' list form, for per-image seeds), or None (global RNG).
Generator = torch.Generator | Sequence[torch.Generator] | None
# noise_sampler(level, next_level) -> unit-variance noise shaped like x; `level` is a sigma for the sigma
# samplers and a timestep for the timestep samplers (k-diffusion's `noise_sampler(sigma, sigma_next)`).
NoiseSampler = Callable[[float, float], Tensor]
# callback(info) after every step; info holds "i", "x", "denoised" and "sigma" or "t".
Callback = Callable[[dict[str, Any]], None]


def randn(
    shape: Sequence[int],
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise drawn exactly as diffusers' `utils.torch_utils.randn_tensor`: on the generator's
    device when that is the CPU (then moved), one draw of shape (1, ...) per generator when given a list, so
    a sampler fed the same generator as a diffusers scheduler consumes the same random numbers."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, Sequence):
        shape_one = (1, *shape[1:])
        draws = [torch.randn(shape_one, generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(draws).to(device)
    rand_device = device
    if generator is not None and generator.device.type == "cpu" and device.type != "cpu":
        rand_device = torch.device("cpu")  # a CPU generator cannot fill a GPU tensor: draw, then move
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def default_noise_sampler(
    x: Tensor, generator: Generator = None, dtype: torch.dtype | None = None
) -> NoiseSampler:
    """A noise sampler that ignores the levels and draws `randn(x.shape)` from `generator` in `dtype`
    (x's by default): one fresh draw per call, in call order, as diffusers' schedulers do in `step`."""
    dtype = x.dtype if dtype is None else dtype

    def sample(level: float, next_level: float) -> Tensor:
        """Unit normal noise like x (the levels are unused: white noise, independent per step)."""
        return randn(x.shape, generator, x.device, dtype).to(x.dtype)

    return sample


def batch_level(level: float, x: Tensor) -> Tensor:
    """A scalar sigma as a (B,) tensor for the denoiser (k-diffusion's `sigma * s_in`), float32 or wider so an
    fp16 x does not round sigma = 14.6 before the network's timestep is computed from it."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.full((x.shape[0],), level, dtype=dtype, device=x.device)


def report(callback: Callback | None, **info: Any) -> None:
    """Call `callback(info)` if one was given (k-diffusion's callback dict)."""
    if callback is not None:
        callback(info)


def sigma_levels(sigmas: Tensor) -> list[float]:
    """A descending sigma grid as Python floats (double precision, no device syncs inside the loop), after
    checking it is one: finite (x = z0 + inf * eps has no representation; under zero terminal SNR start
    from the schedule's finite sigma_max as diffusers does, or use a timestep sampler), non-negative and
    non-increasing."""
    levels = [float(s) for s in sigmas.detach().reshape(-1).cpu().tolist()]
    if len(levels) < 2:
        raise ValueError("a sigma grid needs at least two levels (start and end)")
    if not all(math.isfinite(s) for s in levels):
        raise ValueError(
            "sigma samplers need finite sigmas; under zero terminal SNR start from schedule.sigma_max "
            "(diffusers' 2**-24 substitute, ~4096) or use a timestep sampler (ddim, ddpm, plms)"
        )
    if any(b > a for a, b in zip(levels, levels[1:])) or levels[-1] < 0:
        raise ValueError(f"sigmas must be non-negative and non-increasing, got {levels}")
    return levels


def alpha_bars(schedule: NoiseSchedule, timesteps: Tensor) -> tuple[list[int], list[float]]:
    """A descending integer timestep grid and its alphas_cumprod as Python lists. A negative entry (only
    allowed last) is the clean end, alphas_cumprod = 1 (diffusers' `final_alpha_cumprod` with
    `set_alpha_to_one=True`, DDPM's `self.one`); 0 ends at alphas_cumprod[0] (`set_alpha_to_one=False`)."""
    ts = [int(t) for t in timesteps.detach().reshape(-1).cpu().tolist()]
    if len(ts) < 2:
        raise ValueError("a timestep grid needs at least two entries (start and end)")
    if any(t < 0 for t in ts[:-1]) or any(b > a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be non-increasing with only the last one negative, got {ts}")
    if ts[0] >= schedule.num_train_timesteps:
        raise ValueError(f"timestep {ts[0]} is outside the schedule's {schedule.num_train_timesteps} steps")
    table = schedule.alphas_cumprod.detach().cpu().tolist()
    return ts, [1.0 if t < 0 else float(table[t]) for t in ts]
