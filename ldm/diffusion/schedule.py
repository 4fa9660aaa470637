"""Noise schedules: betas / alphas_cumprod of discrete-time diffusion and their sigma (VE) view.

One table, two views. The discrete view is DDPM's (Ho et al. 2020): x_t = alpha_t z0 + sigma_t eps with
alpha_t = sqrt(alphas_cumprod[t]) and sigma_t = sqrt(1 - alphas_cumprod[t]) ("VP" scaling). The continuous
view is k-diffusion's / EDM's (Karras et al. 2022): x = z0 + sigma eps with sigma = sigma_t / alpha_t
("VE" scaling), so x_VE = x_VP / alpha_t. Samplers written on sigmas and samplers written on discrete
timesteps both read this one object.

Numbers are float64 internally (diffusers computes in float32; the difference is float32 rounding), and
every spacing rule reproduces diffusers' DDIMScheduler / EulerDiscreteScheduler `set_timesteps`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
# CompVis configs call the SD schedule "linear"; we keep diffusers' names and accept these spellings too.
_BETA_ALIASES = {"ldm_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# With zero terminal SNR alphas_cumprod[-1] == 0 and the last sigma is infinite. For interpolation and for
# samplers that start from sigma_max, diffusers' EulerDiscreteScheduler substitutes 2**-24 (the smallest fp16
# subnormal) for it, i.e. sigma_max ~= 4096; we do the same there and only there.
ZERO_SNR_ALPHAS_CUMPROD = 2.0**-24
# Every tensor a NoiseSchedule holds (moved together by `.to`).
_TABLES = ("betas", "alphas", "alphas_cumprod", "sigmas", "log_sigmas", "_table_sigmas", "_table_log_sigmas")


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas linear in beta (Ho et al. 2020, Sec. 4; diffusers "linear")."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas linear in sqrt(beta): Stable Diffusion's schedule (CompVis `make_beta_schedule("linear")`,
    diffusers "scaled_linear")."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999, s: float = 0.008) -> Tensor:
    """Cosine schedule, Nichol & Dhariwal 2021 eq. 17 (diffusers "squaredcos_cap_v2").

    alphas_cumprod(t) = cos((t/T + s) / (1 + s) * pi/2)^2 and beta_t = 1 - abar(t+1)/abar(t), clipped at
    max_beta because the ratio reaches 0 at t = T (a beta of 1 would make the last step singular).
    """

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float64)


def zero_terminal_snr_betas(betas: Tensor) -> Tensor:
    """Rescale betas so the last step has zero SNR, Lin et al. 2023 ("Common Diffusion Noise Schedules and
    Sample Steps are Flawed"), Algorithm 1: shift sqrt(alphas_cumprod) so its last value is 0, then scale it
    so its first value is unchanged."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    # Undo the cumulative product: alpha_t = abar_t / abar_{t-1}; the last one is exactly 0 (beta_T = 1).
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho): Karras et al. 2022
    eq. 5 (k-diffusion `get_sigmas_karras`, without the appended zero). float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_vp(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """VE noise level -> VP coefficients (alpha_t, sigma_t) with alpha_t^2 + sigma_t^2 = 1 and
    sigma = sigma_t / alpha_t (Karras et al. 2022, Table 1, VP column).

    Written as 1/sqrt(1 + sigma^2) and 1/sqrt(1 + sigma^-2) so that sigma = 0 gives (1, 0) and sigma = inf
    (zero terminal SNR) gives (0, 1) instead of inf * 0 = nan.
    """
    alpha_t = torch.rsqrt(1 + sigma**2)
    sigma_t = torch.rsqrt(1 + sigma.reciprocal() ** 2)
    return alpha_t, sigma_t


def canonical_beta_schedule(name: str) -> str:
    """Our name for a beta schedule given ours, diffusers' or CompVis-style spellings."""
    name = _BETA_ALIASES.get(name, name)
    if name not in BETA_SCHEDULES:
        expected = BETA_SCHEDULES + tuple(_BETA_ALIASES)
        raise ValueError(f"unknown beta_schedule {name!r}; expected one of {expected}")
    return name


class NoiseSchedule:
    """Discrete diffusion noise schedule (betas, alphas, alphas_cumprod) with its sigma view and the timestep
    spacing rules of diffusers' schedulers. Holds tensors only, no weights. Defaults are Stable Diffusion v1's
    (CompVis `v1-inference.yaml`; diffusers SD1 `scheduler_config.json`).

    `timestep_spacing` and `steps_offset` are the defaults used by `timesteps()` and `sampling_sigmas()`; they
    live here so that a diffusers scheduler config round-trips through this object. `timestep_spacing=None`
    means "not set": each sampler then uses the default of its diffusers scheduler class (its
    `SamplerSpec.default_spacing` in `ldm.diffusion.samplers`), which is what SD1.5's config, lacking the
    key, gives there.
    """

    def __init__(
        self,
        beta_schedule: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        rescale_zero_terminal_snr: bool = False,
        timestep_spacing: str | None = "leading",
        steps_offset: int = 1,
        trained_betas: Sequence[float] | Tensor | None = None,
    ) -> None:
        if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; expected {TIMESTEP_SPACINGS}")
        self.beta_schedule = canonical_beta_schedule(beta_schedule)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.rescale_zero_terminal_snr = bool(rescale_zero_terminal_snr)
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.trained_betas = None if trained_betas is None else [float(b) for b in trained_betas]

        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float64)
        elif self.beta_schedule == "linear":
            betas = linear_betas(num_train_timesteps, beta_start, beta_end)
        elif self.beta_schedule == "scaled_linear":
            betas = scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
        else:
            betas = cosine_betas(num_train_timesteps)
        if self.rescale_zero_terminal_snr:
            betas = zero_terminal_snr_betas(betas)
        self.num_train_timesteps = len(betas)

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # Exact VE noise levels, ascending in t; sigmas[-1] = inf under zero terminal SNR.
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()
        # The table that sigma <-> t interpolation and sampling use: identical except that an exactly-zero
        # alphas_cumprod is replaced by 2**-24 as in diffusers' EulerDiscreteScheduler, so it stays finite.
        ac = torch.where(self.alphas_cumprod > 0, self.alphas_cumprod, ZERO_SNR_ALPHAS_CUMPROD)
        self._table_sigmas = ((1 - ac) / ac).sqrt()
        self._table_log_sigmas = self._table_sigmas.log()

    # ------------------------------------------------------------------ housekeeping
    def __repr__(self) -> str:
        """Constructor arguments, for logs."""
        return (
            f"NoiseSchedule(beta_schedule={self.beta_schedule!r}, "
            f"num_train_timesteps={self.num_train_timesteps}, "
            f"beta_start={self.beta_start}, beta_end={self.beta_end}, "
            f"rescale_zero_terminal_snr={self.rescale_zero_terminal_snr}, "
            f"timestep_spacing={self.timestep_spacing!r}, steps_offset={self.steps_offset})"
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NoiseSchedule:
        """A copy with every table on `device` and/or in `dtype` (e.g. float32 for a GPU loop); like
        nn.Module.to but not in place, so a float64 master copy can be kept."""
        out = copy.copy(self)
        for name in _TABLES:
            setattr(out, name, getattr(self, name).to(device=device, dtype=dtype))
        return out

    @property
    def device(self) -> torch.device:
        """Device of the tables."""
        return self.alphas_cumprod.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the tables (float64 unless `.to(dtype=...)` was used)."""
        return self.alphas_cumprod.dtype

    @property
    def sigma_min(self) -> float:
        """Smallest noise level, at t = 0."""
        return float(self._table_sigmas[0])

    @property
    def sigma_max(self) -> float:
        """Largest finite noise level, at t = T - 1. Under zero terminal SNR the true value is inf
        (`sigmas[-1]`); this is then diffusers' substitute sqrt((1 - 2**-24) / 2**-24) ~= 4096."""
        return float(self._table_sigmas[-1])

    # ------------------------------------------------------------------ discrete-time (VP) view
    def vp_coefficients(self, t: Tensor | int | float) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) (Ho et al. 2020 eq. 4). Integer t indexes the
        exact table (so t = T-1 under zero terminal SNR gives (0, 1)); floating t goes through `t_to_sigma`
        (log interpolation, so it inverts `sigma_to_t`)."""
        t = torch.as_tensor(t, device=self.device)
        if t.is_floating_point():
            return sigma_to_vp(self.t_to_sigma(t))
        ac = self.alphas_cumprod[t]
        return ac.sqrt(), (1 - ac).sqrt()

    def snr(self, t: Tensor | int | float) -> Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) = 1 / sigma^2 (Kingma et al. 2021), as in min-SNR
        weighting (Hang et al. 2023). Integer t is exact (0 at a zero-SNR terminal step); floating t
        interpolates."""
        t = torch.as_tensor(t, device=self.device)
        if t.is_floating_point():
            return self.t_to_sigma(t) ** -2
        ac = self.alphas_cumprod[t]
        return ac / (1 - ac)

    def add_noise(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process q(x_t | z0): x_t = alpha_t z0 + sigma_t eps, Ho et al. 2020 eq. 4 (diffusers
        `add_noise`). t is an integer tensor of shape (B,)."""
        alpha_t, sigma_t = self.vp_coefficients(t.to(self.device))
        shape = (-1,) + (1,) * (z0.ndim - 1)
        alpha_t = alpha_t.to(z0.device, z0.dtype).reshape(shape)
        sigma_t = sigma_t.to(z0.device, z0.dtype).reshape(shape)
        return alpha_t * z0 + sigma_t * noise

    # ------------------------------------------------------------------ sigma (VE) view
    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """Continuous timestep for a noise level, interpolating linearly in log sigma between neighbouring
        integer timesteps (k-diffusion `DiscreteSchedule.sigma_to_t`, diffusers Euler `_sigma_to_t`). Values
        outside [sigma_min, sigma_max] clamp to t = 0 and t = T - 1; sigma = inf gives T - 1."""
        sigma = torch.as_tensor(sigma)
        sigma = sigma if sigma.is_floating_point() else sigma.float()
        # t goes to the network: float32 or wider (fp16 cannot hold 998.6), whatever dtype sigma came in.
        out_dtype = torch.promote_types(sigma.dtype, torch.float32)
        log_sigmas = self._table_log_sigmas.to(sigma.device)
        log_sigma = sigma.to(log_sigmas.dtype).log()
        # log_sigmas increases with t: the left neighbour is the last entry <= log_sigma.
        low = torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True).reshape(sigma.shape) - 1
        low = low.clamp(0, len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (low + w).to(out_dtype)

    def t_to_sigma(self, t: Tensor | float, interpolation: str = "log") -> Tensor:
        """Noise level at a (possibly fractional) timestep, in the tables' dtype, from the finite table (see
        `sigma_max`). "log" interpolates linearly in log sigma, as k-diffusion `DiscreteSchedule.t_to_sigma`:
        the exact inverse of `sigma_to_t`. "linear" interpolates in sigma, as diffusers'
        EulerDiscreteScheduler does for its inference grid (`np.interp`). Both agree at integer t."""
        if interpolation not in ("log", "linear"):
            raise ValueError(f"interpolation must be 'log' or 'linear', got {interpolation!r}")
        t = torch.as_tensor(t, device=self.device).to(self.dtype).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low
        table = self._table_log_sigmas if interpolation == "log" else self._table_sigmas
        value = (1 - w) * table[low] + w * table[low + 1]
        return value.exp() if interpolation == "log" else value

    # ------------------------------------------------------------------ sampling grids
    def timesteps(
        self,
        steps: int,
        spacing: str | None = None,
        steps_offset: int | None = None,
        discrete: bool = True,
    ) -> Tensor:
        """Descending inference timesteps, as diffusers' `set_timesteps` (Lin et al. 2023, Table 2):
        "leading" = arange(steps) * (T // steps) + offset, "trailing" = round(arange(T, 0, -T/steps)) - 1,
        "linspace" = linspace(0, T - 1, steps). `discrete=True` gives int64 (DDIMScheduler rounds linspace);
        `discrete=False` gives float64 as EulerDiscreteScheduler, which keeps fractional linspace steps.
        steps_offset applies to "leading" only, as in diffusers."""
        spacing = spacing or self.timestep_spacing or "leading"
        steps_offset = self.steps_offset if steps_offset is None else steps_offset
        T = self.num_train_timesteps
        if not 0 < steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        # numpy on purpose: the same float arithmetic as diffusers, so the rounding ties match bit for bit.
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, steps)[::-1]
            ts = ts.round() if discrete else ts
        elif spacing == "leading":
            ts = (np.arange(steps) * (T // steps)).round()[::-1] + steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / steps)) - 1
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {TIMESTEP_SPACINGS}")
        out = torch.from_numpy(ts.copy())
        return (out.long() if discrete else out.double()).to(self.device)

    def sampling_sigmas(
        self,
        steps: int,
        spacing: str | None = None,
        steps_offset: int | None = None,
        karras: bool = False,
        rho: float = 7.0,
    ) -> Tensor:
        """Descending noise levels for a sigma-space sampler, with a final 0 appended (steps + 1 values),
        equal to diffusers' EulerDiscreteScheduler(...).set_timesteps(steps).sigmas (interpolation_type
        "linear", final_sigmas_type "zero"). `karras=True` respaces them with Karras et al. 2022 eq. 5 between
        the spaced grid's end points, as diffusers' `use_karras_sigmas` does. Tables' dtype; use
        `sigma_to_t` for the network timesteps."""
        ts = self.timesteps(steps, spacing, steps_offset, discrete=False)
        sigmas = self.t_to_sigma(ts, interpolation="linear")
        if karras:
            sigmas = karras_sigmas(steps, float(sigmas[-1]), float(sigmas[0]), rho).to(sigmas)
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    # ------------------------------------------------------------------ diffusers interop
    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Build from a diffusers `scheduler_config.json` dict (DDIM/DDPM/Euler/DPM-Solver all share these
        keys). Sampler-only keys (prediction_type, clip_sample, ...) are ignored: the parameterization belongs
        to the Denoiser. Missing keys take diffusers' defaults, not ours."""
        return cls(
            beta_schedule=config.get("beta_schedule", "linear"),
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_start=config.get("beta_start", 0.0001),
            beta_end=config.get("beta_end", 0.02),
            rescale_zero_terminal_snr=config.get("rescale_betas_zero_snr", False),
            # Absent in older configs (SD1.5's): left unset, each sampler takes its diffusers class default.
            timestep_spacing=config.get("timestep_spacing"),
            steps_offset=config.get("steps_offset", 0),
            trained_betas=config.get("trained_betas"),
        )

    def to_diffusers_config(self, prediction_type: str | None = None) -> dict[str, Any]:
        """A diffusers scheduler config for this schedule (loadable by DDIMScheduler, EulerDiscreteScheduler,
        ...). clip_sample / set_alpha_to_one are False as in SD's released config; pass `prediction_type`
        ("epsilon", "v_prediction", "sample") to record the network's parameterization too."""
        config: dict[str, Any] = {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": "squaredcos_cap_v2" if self.beta_schedule == "cosine" else self.beta_schedule,
            "rescale_betas_zero_snr": self.rescale_zero_terminal_snr,
            "steps_offset": self.steps_offset,
            "clip_sample": False,
            "set_alpha_to_one": False,
        }
        if self.timestep_spacing is not None:
            config["timestep_spacing"] = self.timestep_spacing
        if self.trained_betas is not None:
            config["trained_betas"] = list(self.trained_betas)
        if prediction_type is not None:
            config["prediction_type"] = prediction_type
        return config
