"""The denoising training loss as a small callable: `loss(net, z0, context) -> per-sample loss`.

DESIGN.md pattern 4 (NVlabs/edm `EDMLoss`): timestep sampling, the regression target of the network's
parameterization, and the weighting are arguments, so the Lightning system only calls it. Sources:
- epsilon / v / x0 targets: Ho et al. 2020; Salimans & Ho 2022 (v); see `denoiser.training_target`.
- timestep sampling: uniform (DDPM), logit-normal (Esser et al. 2024, SD3 Sec. 3.1), or given weights.
- weighting: min-SNR-gamma (Hang et al. 2023, eq. 8-10), written for each target.
- noise offset (Guttenberg 2023, "Diffusion with Offset Noise"): a per-channel constant added to the noise.
- input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias"): the network sees
  x_t built from a perturbed noise, the target keeps the original one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.denoiser import append_dims, canonical_prediction_type, training_target
from ldm.diffusion.schedule import NoiseSchedule

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "weights")
WEIGHTINGS = ("none", "min_snr")


class DiffusionLoss:
    """Sample t and noise, build x_t, regress the network output onto its target, weight per sample."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        timestep_weights: Sequence[float] | None = None,
        weighting: str = "none",
        min_snr_gamma: float = 5.0,
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
    ):
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling={timestep_sampling!r}: expected one of {TIMESTEP_SAMPLINGS}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}: expected one of {WEIGHTINGS}")
        self.schedule = schedule
        self.prediction_type = canonical_prediction_type(prediction_type)
        T = schedule.num_train_timesteps
        if self.prediction_type == "epsilon" and float(schedule.alphas_cumprod[-1]) == 0.0:
            # At zero terminal SNR x_T holds no signal: an eps network cannot give z0 there (Lin et al. 2023).
            raise ValueError("a zero-terminal-SNR schedule needs prediction_type v_prediction (or sample)")
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        if timestep_sampling == "weights":
            if timestep_weights is None or len(timestep_weights) != T:
                raise ValueError(f"timestep_sampling='weights' needs timestep_weights with {T} values")
            w = torch.as_tensor(list(timestep_weights), dtype=torch.float64)
            if (w < 0).any() or w.sum() <= 0:
                raise ValueError("timestep_weights must be non-negative and not all zero")
            self.timestep_probs = w / w.sum()
        self.weighting, self.min_snr_gamma = weighting, min_snr_gamma
        self.noise_offset, self.input_perturbation = noise_offset, input_perturbation

    def sample_timesteps(
        self, n: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> Tensor:
        """n integer timesteps in [0, T) from the configured distribution (drawn on the generator's device,
        so a CPU generator gives the same draws whatever device trains)."""
        T = self.schedule.num_train_timesteps
        where = generator.device if generator is not None else torch.device("cpu")
        if self.timestep_sampling == "uniform":
            t = torch.randint(0, T, (n,), device=where, generator=generator)
        elif self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(
                self.logit_mean + self.logit_std * torch.randn(n, device=where, generator=generator)
            )
            t = (u * T).long().clamp(0, T - 1)
        else:
            t = torch.multinomial(self.timestep_probs.to(where), n, replacement=True, generator=generator)
        return t.to(device)

    def weight(self, t: Tensor) -> Tensor:
        """Per-sample loss weight. min-SNR-gamma: min(SNR, gamma) / SNR for eps, / (SNR + 1) for v, and
        min(SNR, gamma) for x0 (Hang et al. 2023): the same weighting of the x0 error for any target."""
        if self.weighting == "none":
            return torch.ones(t.shape, device=t.device)
        snr = self.schedule.snr(t.to(self.schedule.device)).to(t.device, torch.float32)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr.clamp(min=1e-12)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    def __call__(
        self,
        net: Callable[..., Tensor],
        z0: Tensor,
        context: Any = None,
        generator: torch.Generator | None = None,
        **net_kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """(per-sample weighted MSE (B,), timesteps (B,)) for clean latents z0 and their conditioning."""
        b = z0.shape[0]
        t = self.sample_timesteps(b, z0.device, generator)
        where = generator.device if generator is not None else z0.device

        def randn(shape: tuple[int, ...]) -> Tensor:
            return torch.randn(shape, device=where, generator=generator).to(z0.device, z0.dtype)

        noise = randn(tuple(z0.shape))
        if self.noise_offset:
            noise = noise + self.noise_offset * randn((*z0.shape[:2], 1, 1))
        seen_noise = noise
        if self.input_perturbation:
            seen_noise = noise + self.input_perturbation * randn(tuple(z0.shape))
        alpha_t, sigma_t = self.schedule.vp_coefficients(t.to(self.schedule.device))
        alpha_t = append_dims(alpha_t.to(z0.device, z0.dtype), z0.ndim)
        sigma_t = append_dims(sigma_t.to(z0.device, z0.dtype), z0.ndim)
        x_t = alpha_t * z0 + sigma_t * seen_noise
        target = training_target(self.prediction_type, z0, noise, alpha_t, sigma_t)
        output = net(x_t, t, context, **net_kwargs)
        mse = (output.float() - target.float()).pow(2).mean(dim=tuple(range(1, z0.ndim)))
        return mse * self.weight(t), t


class LossByTimestep:
    """Mean training loss per timestep range over a window of optimizer steps, {"t000-099": mean, ...}:
    shows where in the chain a model is weak. Sums and counts stay on the loss's device (`index_add_`), so
    nothing is read back to the host. A step's batches are `add`ed as pending and join the window at
    `commit()`, once the optimizer has stepped: a step that is cut short (Ctrl-C, an exception) or skipped
    (non-finite loss) is not counted, so the window saved in a checkpoint is that of the completed steps and
    a resumed run logs the means of the uninterrupted one. `pop()` returns the window's means as tensors
    (NaN for a range no sample fell in) and starts a new window."""

    def __init__(self, num_train_timesteps: int, buckets: int = 10):
        self.width = num_train_timesteps // buckets
        self.buckets = buckets
        last = [(k * self.width, (k + 1) * self.width - 1) for k in range(buckets - 1)]
        last.append(((buckets - 1) * self.width, num_train_timesteps - 1))
        self.names = [f"t{lo:03d}-{hi:03d}" for lo, hi in last]
        self.window: Tensor | None = None  # (2, buckets): sums, counts of the committed steps
        self.pending: Tensor | None = None  # the same for the step in progress

    def add(self, loss: Tensor, t: Tensor) -> None:
        """Fold a batch's per-sample losses at timesteps `t` into the step in progress."""
        loss = loss.detach().float()
        if self.pending is None:
            self.pending = loss.new_zeros(2, self.buckets)
        index = (t.to(loss.device) // self.width).clamp(max=self.buckets - 1)
        self.pending[0].index_add_(0, index, loss)
        self.pending[1].index_add_(0, index, torch.ones_like(loss))

    def commit(self, keep: bool = True) -> None:
        """The step in progress is done: into the window (`keep`), or dropped (a skipped step)."""
        pending, self.pending = self.pending, None
        if pending is None or not keep:
            return
        if self.window is None:
            self.window = pending
        else:  # (a window restored from a checkpoint is on the CPU)
            self.window = self.window.to(pending.device) + pending

    def pop(self) -> dict[str, Tensor]:
        """The window's mean loss per range (0-dim tensors, no host sync), then an empty window."""
        if self.window is None:
            return {}
        means = self.window[0] / self.window[1]  # 0 / 0 = NaN: no sample in that range in the window
        self.window = None
        return dict(zip(self.names, means.unbind()))

    def state_dict(self) -> dict:
        return {"window": self.window}

    def load_state_dict(self, state: dict) -> None:
        self.window, self.pending = state["window"], None


def prior_preservation_loss(loss: Tensor, is_prior: Tensor, weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """DreamBooth's objective (Ruiz et al. 2023, Eq. 2): the mean loss of the instance samples plus `weight`
    times the mean loss of the class (prior-preservation) samples, as diffusers' `train_dreambooth.py`
    adds `prior_loss_weight * prior_loss`. Returns (total, instance, prior); prior is 0 without class
    samples. `loss` is per sample, `is_prior` a boolean mask of the same length, with at least one instance
    sample (`DreamBoothDataset.collate` puts one per example first). Masked sums, not boolean indexing or a
    check of the mask: either reads the mask back to the host, a device sync every step."""
    prior_mask = is_prior.to(loss.device, loss.dtype)
    instance_mask = 1 - prior_mask
    instance = (loss * instance_mask).sum() / instance_mask.sum()
    prior = (loss * prior_mask).sum() / prior_mask.sum().clamp(min=1)
    return instance + weight * prior, instance, prior
