"""Parameterizations (eps / v / x0) and the Denoiser that turns a discrete-time network into D(x, sigma).

Conventions. VP quantities (Ho et al. 2020): x_t = alpha_t z0 + sigma_t eps with alpha_t^2 + sigma_t^2 = 1.
v = alpha_t eps - sigma_t z0 (Salimans & Ho 2022, Sec. 4 and App. D). VE quantities (Karras et al. 2022):
x = z0 + sigma eps, sigma = sigma_t / alpha_t, so x_t = alpha_t x. The conversions below are exact
algebra on these identities; each is a function of (prediction, x_t, alpha_t, sigma_t) with alpha_t and
sigma_t broadcastable against x_t.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.schedule import NoiseSchedule, sigma_to_vp

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_PREDICTION_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def canonical_prediction_type(name: str) -> str:
    """diffusers' name ("epsilon", "v_prediction", "sample") of a parameterization; also takes eps/v/x0."""
    name = _PREDICTION_ALIASES.get(name, name)
    if name not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {name!r}; expected one of {PREDICTION_TYPES}")
    return name


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-sample (B,) tensor broadcasts over (B, C, H, W)
    (k-diffusion `utils.append_dims`)."""
    if x.ndim > ndim:
        raise ValueError(f"cannot broadcast a {x.ndim}-d tensor to {ndim} dims")
    return x[(...,) + (None,) * (ndim - x.ndim)]


def eps_to_x0(eps: Tensor, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """z0 = (x_t - sigma_t eps) / alpha_t (Ho et al. 2020 eq. 15). Undefined where alpha_t = 0."""
    return (x_t - sigma_t * eps) / alpha_t


def x0_to_eps(x0: Tensor, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """eps = (x_t - alpha_t z0) / sigma_t. Undefined where sigma_t = 0."""
    return (x_t - alpha_t * x0) / sigma_t


def v_to_x0(v: Tensor, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """z0 = alpha_t x_t - sigma_t v (Salimans & Ho 2022, App. D). Finite everywhere; -v at zero SNR."""
    return alpha_t * x_t - sigma_t * v


def v_to_eps(v: Tensor, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """eps = sigma_t x_t + alpha_t v (Salimans & Ho 2022, App. D). Finite everywhere."""
    return sigma_t * x_t + alpha_t * v


def eps_to_v(eps: Tensor, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """v = (eps - sigma_t x_t) / alpha_t: substitute z0 = (x_t - sigma_t eps)/alpha_t into v = alpha_t eps -
    sigma_t z0 and use alpha_t^2 + sigma_t^2 = 1."""
    return (eps - sigma_t * x_t) / alpha_t


def x0_to_v(x0: Tensor, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """v = (alpha_t x_t - z0) / sigma_t: substitute eps = (x_t - alpha_t z0)/sigma_t into v = alpha_t eps -
    sigma_t z0 and use alpha_t^2 + sigma_t^2 = 1."""
    return (alpha_t * x_t - x0) / sigma_t


def to_x0(output: Tensor, prediction_type: str, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """A network output of the given parameterization -> z0 estimate (VP x_t)."""
    if prediction_type == "epsilon":
        return eps_to_x0(output, x_t, alpha_t, sigma_t)
    if prediction_type == "v_prediction":
        return v_to_x0(output, x_t, alpha_t, sigma_t)
    if prediction_type == "sample":
        return output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def to_eps(output: Tensor, prediction_type: str, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """A network output of the given parameterization -> eps estimate (VP x_t)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return v_to_eps(output, x_t, alpha_t, sigma_t)
    if prediction_type == "sample":
        return x0_to_eps(output, x_t, alpha_t, sigma_t)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def training_target(
    prediction_type: str, z0: Tensor, noise: Tensor, alpha_t: Tensor, sigma_t: Tensor
) -> Tensor:
    """What a network of this parameterization is regressed onto: eps (Ho et al. 2020), v = alpha_t eps -
    sigma_t z0 (Salimans & Ho 2022) or z0 (diffusers `prediction_type="sample"`)."""
    prediction_type = canonical_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha_t * noise - sigma_t * z0
    return z0


class Denoiser:
    """Wraps a discrete-time network `net(x_t, t, context, **kwargs)` trained with `prediction_type` on
    `schedule`, and exposes it in two views (Karras et al. 2022 Sec. 5 preconditioning; k-diffusion
    `external.DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser`; NVlabs/edm `VPPrecond`):

    * sigma view, for k-diffusion-style samplers: `denoiser(x, sigma, context)` is D(x; sigma), the z0
      estimate for x = z0 + sigma eps. Internally D = c_skip x + c_out F(c_in x, t(sigma)) with
      c_in = 1/sqrt(sigma^2 + 1) (which is alpha_t: the net sees VP-scaled input),
      t = schedule.sigma_to_t(sigma) and (c_skip, c_out) = (1, -sigma) for eps,
      (1/(sigma^2+1), -sigma/sqrt(sigma^2+1)) for v, (0, 1) for x0.
      `predict_eps(x, sigma, context)` gives the matching eps estimate.
    * timestep view, for DDPM/DDIM samplers that step on integer timesteps as diffusers does:
      `net_output_at(x_t, t, context)` is the raw network output and `predict_at(x_t, t, context)` returns
      (z0, eps) for VP-scaled x_t, with alpha_t, sigma_t read from the exact table.

    Zero terminal SNR (Lin et al. 2023): at t = T-1, alpha_t = 0 and sigma_t = 1, so v = alpha_t eps -
    sigma_t z0 = -z0 and z0 = alpha_t x_t - sigma_t v = -v exactly, whatever x_t is (timestep view). In the
    sigma view (sigma = inf) the limits are c_in = 0, c_skip = 0, c_out = -1, so D = -F(0, T-1):
    finite, but x = z0 + inf eps cannot be represented, so the net sees c_in x = 0 rather than the noise.
    Samplers that start from pure noise should take that first step in the timestep view, or start from
    diffusers' finite `schedule.sigma_max` (~4096). An eps network cannot be evaluated there at all
    (z0 = (x_t - eps) / 0), Lin et al.'s reason for requiring v-prediction; we return what the algebra gives
    (inf / nan) rather than hide it.

    Coefficients are computed in float32 or wider and cast to x's dtype just before they touch x.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
    ) -> None:
        self.net = net
        self.schedule = schedule
        self.prediction_type = canonical_prediction_type(prediction_type)

    def __repr__(self) -> str:
        """Parameterization and schedule, for logs."""
        return f"Denoiser(prediction_type={self.prediction_type!r}, schedule={self.schedule!r})"

    @property
    def sigma_min(self) -> float:
        """Smallest noise level the network was trained on."""
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        """Largest finite noise level (see NoiseSchedule.sigma_max)."""
        return self.schedule.sigma_max

    # ------------------------------------------------------------------ sigma view
    def _sigma_tensor(self, sigma: Tensor | float, x: Tensor) -> Tensor:
        """sigma as a (B,) float tensor (float32 or wider) on x's device; scalars broadcast to the batch."""
        sigma = torch.as_tensor(sigma, device=x.device)
        if not sigma.is_floating_point():
            sigma = sigma.float()
        sigma = sigma.to(torch.promote_types(sigma.dtype, torch.float32))
        return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) of Karras et al. 2022 Table 1 with sigma_data = 1 for this parameterization
        (sgm `denoiser_scaling.py` EpsScaling / VScaling). Written to stay finite at sigma = 0 and sigma = inf
        wherever the limit is finite."""
        alpha_t, sigma_t = sigma_to_vp(sigma)  # alpha_t = 1/sqrt(1+sigma^2), sigma_t = sigma/sqrt(1+sigma^2)
        c_in = alpha_t
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction_type == "v_prediction":
            return alpha_t**2, -sigma_t, c_in
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in

    def _net_at_sigma(self, x: Tensor, sigma: Tensor, context: Any, **kwargs: Any) -> Tensor:
        """Network output F(c_in x, t(sigma)) for (B,) sigma."""
        _, _, c_in = self.scalings(sigma)
        t = self.schedule.sigma_to_t(sigma)
        x_t = x * append_dims(c_in, x.ndim).to(x.dtype)
        return self.net(x_t, t, context, **kwargs)

    def __call__(self, x: Tensor, sigma: Tensor | float, context: Any = None, **kwargs: Any) -> Tensor:
        """D(x; sigma): z0 estimate for VE-scaled x = z0 + sigma eps (Karras et al. 2022 eq. 7)."""
        sigma = self._sigma_tensor(sigma, x)
        c_skip, c_out, _ = self.scalings(sigma)
        output = self._net_at_sigma(x, sigma, context, **kwargs)
        c_skip = append_dims(c_skip, x.ndim).to(x.dtype)
        c_out = append_dims(c_out, x.ndim).to(x.dtype)
        # Skip the c_skip term when it is exactly 0 (x0-prediction, zero-SNR v): 0 * x is nan if x is inf.
        skip = torch.where(c_skip == 0, torch.zeros_like(x), c_skip * x)
        return skip + c_out * output

    def predict_eps(self, x: Tensor, sigma: Tensor | float, context: Any = None, **kwargs: Any) -> Tensor:
        """eps estimate for VE-scaled x = z0 + sigma eps; equals (x - D(x; sigma)) / sigma, computed without
        the division where the parameterization allows (exact for eps nets, finite at sigma = inf for v)."""
        sigma = self._sigma_tensor(sigma, x)
        output = self._net_at_sigma(x, sigma, context, **kwargs)
        alpha_t, sigma_t = (append_dims(c, x.ndim).to(x.dtype) for c in sigma_to_vp(sigma))
        return to_eps(output, self.prediction_type, x * alpha_t, alpha_t, sigma_t)

    # ------------------------------------------------------------------ timestep view
    def net_output_at(self, x_t: Tensor, t: Tensor | int, context: Any = None, **kwargs: Any) -> Tensor:
        """Raw network output at discrete timestep(s) t for VP-scaled x_t (what diffusers' pipelines feed the
        UNet); an int or 0-d t is broadcast to the batch."""
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        return self.net(x_t, t, context, **kwargs)

    def predict_at(
        self, x_t: Tensor, t: Tensor | int, context: Any = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """(z0, eps) estimates at discrete timestep(s) t for VP-scaled x_t = alpha_t z0 + sigma_t eps, from
        one network call (DDIM, Song et al. 2021 eq. 12, needs both)."""
        output = self.net_output_at(x_t, t, context, **kwargs)
        return self.convert_at(output, x_t, t)

    def convert_at(self, output: Tensor, x_t: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """(z0, eps) from a network output already computed at timestep(s) t, e.g. a guided combination of
        conditional and unconditional outputs (a linear combination converts linearly)."""
        t = torch.as_tensor(t, device=self.schedule.device)
        alpha_t, sigma_t = self.schedule.vp_coefficients(t)
        alpha_t = append_dims(alpha_t.to(x_t.device), x_t.ndim).to(x_t.dtype)
        sigma_t = append_dims(sigma_t.to(x_t.device), x_t.ndim).to(x_t.dtype)
        if self.prediction_type == "v_prediction":
            # Both conversions are finite for v, including alpha_t = 0.
            return v_to_x0(output, x_t, alpha_t, sigma_t), v_to_eps(output, x_t, alpha_t, sigma_t)
        if self.prediction_type == "epsilon":
            return eps_to_x0(output, x_t, alpha_t, sigma_t), output
        return output, x0_to_eps(output, x_t, alpha_t, sigma_t)
