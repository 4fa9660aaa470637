"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a Denoiser.

`cfg_denoiser(denoiser, scale, rescale=0.0)` returns a Denoiser with the same schedule and parameterization
whose network is `GuidedNet`: one batched forward on [uncond; cond] (the batch concatenated, as diffusers'
StableDiffusionPipeline does), then uncond + scale (cond - uncond) on the raw network output, every channel,
then the optional rescale of Lin et al. 2023. Because D(x; sigma) and (z0, eps) are affine in the network
output at fixed x and sigma, guiding the raw output equals guiding z0 or eps; doing it on the raw output is
what makes `rescale` (a ratio of standard deviations, not affine) match diffusers' `rescale_noise_cfg`, and it
gives both of the Denoiser's views, the sigma view and the timestep view, for free.

Usage: `guided = cfg_denoiser(denoiser, 7.5)`, then any sampler with
`extra_args={"context": cond, "uncond_context": uncond}`; a negative prompt is just another `uncond_context`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser, append_dims

Context = Tensor | Mapping[str, Tensor] | None


def cfg_combine(uncond: Tensor, cond: Tensor, scale: float | Tensor) -> Tensor:
    """uncond + scale (cond - uncond): classifier-free guidance, Ho & Salimans 2022 eq. 6 (scale = 1 + w in
    their notation). A (B,) tensor scale guides each sample with its own strength."""
    if isinstance(scale, Tensor):
        scale = append_dims(scale.to(cond), cond.ndim)
    return uncond + scale * (cond - uncond)


def rescale_cfg(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale, Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"),
    Sec. 3.4 eq. 15-16: scale the guided output to the conditional output's per-sample std, then mix with the
    unrescaled one by `rescale` (diffusers `rescale_noise_cfg`; std over all non-batch dims, unbiased)."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    return rescale * (guided * (std_cond / std_guided)) + (1 - rescale) * guided


def _pair(uncond: Context, cond: Context, batch: int) -> Context:
    """[uncond; cond] along the batch for a tensor or a dict of tensors (e.g. cross-attention tokens plus a
    pooled vector); a batch-1 uncond (one negative prompt for all images) is expanded to the batch."""
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            raise ValueError("uncond_context must be a dict with the same keys as context")
        return {key: _pair(uncond[key], cond[key], batch) for key in cond}
    if not isinstance(cond, Tensor) or not isinstance(uncond, Tensor):
        raise TypeError(f"contexts must be tensors or dicts of tensors, got {type(cond)} and {type(uncond)}")
    if uncond.shape[0] == 1 and batch > 1:
        uncond = uncond.expand(batch, *uncond.shape[1:])
    return torch.cat([uncond, cond])


class GuidedNet:
    """A network wrapper `net(x_t, t, context, uncond_context=None, **kwargs)` that evaluates conditional and
    unconditional outputs in one batched call and returns their guided combination (Ho & Salimans 2022;
    sgm `guiders.py` VanillaCFG). Extra tensor kwargs with the batch size (e.g. a ControlNet hint) are
    duplicated for both halves; other kwargs pass through unchanged."""

    def __init__(self, net: Callable[..., Tensor], scale: float | Tensor = 7.5, rescale: float = 0.0) -> None:
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.net = net
        self.scale = scale
        self.rescale = rescale

    def __repr__(self) -> str:
        """Scale and rescale, for logs."""
        return f"GuidedNet(scale={self.scale}, rescale={self.rescale})"

    def _unguided(self) -> bool:
        """True when the guided output is the conditional one (scale exactly 1), so one half suffices."""
        return not isinstance(self.scale, Tensor) and self.scale == 1.0

    def __call__(
        self, x_t: Tensor, t: Tensor, context: Context = None, uncond_context: Context = None, **kwargs: Any
    ) -> Tensor:
        """Guided network output for VP-scaled x_t at timestep(s) t."""
        if self._unguided():
            return self.net(x_t, t, context, **kwargs)
        if uncond_context is None or context is None:
            raise ValueError("classifier-free guidance needs both `context` and `uncond_context`")
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t_in = torch.cat([t, t]) if t.ndim > 0 else t
        doubled = {
            k: torch.cat([v, v]) if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == batch else v
            for k, v in kwargs.items()
        }
        out = self.net(torch.cat([x_t, x_t]), t_in, _pair(uncond_context, context, batch), **doubled)
        out_uncond, out_cond = out.chunk(2)
        guided = cfg_combine(out_uncond, out_cond, self.scale)
        if self.rescale > 0:
            guided = rescale_cfg(guided, out_cond, self.rescale)
        return guided


def cfg_denoiser(denoiser: Denoiser, scale: float | Tensor = 7.5, rescale: float = 0.0) -> Denoiser:
    """`denoiser` with classifier-free guidance: a Denoiser on the same schedule and parameterization around
    `GuidedNet(denoiser.net, scale, rescale)`, so `guided(x, sigma, context=c, uncond_context=u)` (sigma view)
    and `guided.predict_at(x_t, t, context=c, uncond_context=u)` (timestep view) are both guided.
    `rescale` is diffusers' `guidance_rescale` (0.7 in Lin et al. 2023 for zero-SNR v models). Scale 1 runs
    the conditional half only; StableDiffusionPipeline skips guidance for every scale <= 1, which a caller
    wanting its exact behaviour should mirror by not wrapping."""
    return Denoiser(GuidedNet(denoiser.net, scale, rescale), denoiser.schedule, denoiser.prediction_type)
