"""`LatentDiffusionSystem`: stage two of LDM (Rombach et al. 2022) as a thin LightningModule.

`training_step` reads like the paper: encode images with the frozen autoencoder (scaled latents), embed
captions with the frozen conditioner (dropping some to the empty caption for classifier-free guidance, Ho &
Salimans 2022), and call the loss (ldm.diffusion.loss) on the UNet. The math lives elsewhere; this wires
it, keeps an EMA of the UNet (in the checkpoint; used for validation and export) and logs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ldm.diffusion.loss import DiffusionLoss, LossByTimestep, prior_preservation_loss
from ldm.diffusion.schedule import NoiseSchedule
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.ema import EMA
from ldm.nn.unet import UNetModel


class LatentDiffusionSystem(pl.LightningModule):
    """Trainable UNet in the latent space of a frozen autoencoder, conditioned by a frozen conditioner."""

    val_metrics = ("val/loss",)  # what validation logs: checkpoint monitors are checked against it

    def __init__(
        self,
        unet: UNetModel,
        autoencoder: AutoencoderKL,
        conditioner: nn.Module,
        schedule: NoiseSchedule,
        loss: Callable[..., DiffusionLoss],
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        prediction_type: str = "epsilon",
        cond_key: str = "caption",
        ucg_rate: float = 0.1,
        ema: dict | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        init_from: str | None = None,
        init_from_ema: bool = False,
        sample_size: int | None = None,
        sample_posterior: bool = True,
        log_buckets_every_n_steps: int = 100,
        seed: int = 0,
        prior_loss_weight: float = 1.0,
        sampling: dict | None = None,
        trainable: str | None = None,
        text_encoder_lr: float | None = None,
        lora: dict | None = None,
        export_formats: list | None = None,
    ):
        super().__init__()
        if prior_loss_weight < 0:
            raise ValueError(f"model.prior_loss_weight={prior_loss_weight}: must be >= 0")
        # DreamBooth: weight of the class (prior-preservation) samples' loss, for batches with "is_prior".
        self.prior_loss_weight = prior_loss_weight
        if not 0.0 <= ucg_rate < 1.0:
            raise ValueError(f"model.ucg_rate={ucg_rate}: must be in [0, 1)")
        if unet.context_dim is not None and getattr(conditioner, "output_dim", None) not in (
            None,
            unet.context_dim,
        ):
            raise ValueError(
                f"model.unet.context_dim={unet.context_dim}, conditioner output_dim={conditioner.output_dim}"
            )
        if unet.in_channels != autoencoder.embed_dim:
            raise ValueError(
                f"model.unet.in_channels={unet.in_channels} != autoencoder latents {autoencoder.embed_dim}"
            )
        self.unet, self.autoencoder, self.conditioner = unet, autoencoder, conditioner
        self.autoencoder.requires_grad_(False).eval()
        self.conditioner.requires_grad_(False).eval()
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.loss_fn = loss(schedule=schedule, prediction_type=prediction_type)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.cond_key, self.ucg_rate = cond_key, ucg_rate
        self.sample_posterior = sample_posterior
        self.seed = seed
        # Latent side the model is built for (diffusers' unet `sample_size`): the default image side of
        # its samples, and what the data's resolution must give (ldm.training.checks).
        self.sample_size = sample_size
        self.log_buckets_every_n_steps = log_buckets_every_n_steps
        self.loss_by_timestep = LossByTimestep(schedule.num_train_timesteps)
        # Recommended {sampler, steps, guidance_scale}, carried into exports (`Pipeline.recommended`).
        from ldm.pipeline import check_sampling

        self.sampling = check_sampling(sampling, "model.sampling")
        if gradient_checkpointing:
            self.unet.set_gradient_checkpointing(True)
        if init_from:
            self.load_weights_from(init_from, use_ema=init_from_ema)
        self._set_trainable(trainable, lora, text_encoder_lr, init_from, init_from_ema, ema, export_formats)
        self.ema = EMA(self.unet, **ema) if ema else None
        # Compiled forward kept outside the module tree, so state-dict keys stay the original ones.
        object.__setattr__(self, "_unet_forward", torch.compile(self.unet) if compile else self.unet)

    # ------------------------------------------------------------------ frozen parts
    def _set_trainable(
        self, trainable: str | None, lora: dict | None, text_encoder_lr: float | None, init_from: str | None,
        init_from_ema: bool, ema: dict | None, export_formats: list | None,
    ) -> None:  # fmt: skip
        """The trainable-parameter policy (ldm/adapters/policy.py): full UNet, UNet + text encoder (own LR),
        or LoRA adapters only; everything else frozen."""
        from ldm.adapters.policy import LoraSettings, apply_trainable, frozen_checksum, resolve_trainable

        self.trainable = resolve_trainable(trainable, lora)
        self.text_encoder_lr = text_encoder_lr
        self.lora = LoraSettings.from_config(lora) if lora else None
        self.export_formats = list(export_formats or ["ldm"])
        unknown = sorted(set(self.export_formats) - {"ldm", "single_file", "diffusers"})
        if unknown:
            raise ValueError(f"model.export_formats: unknown {unknown}; use ldm, single_file, diffusers")
        if self.trainable == "lora":
            # The checkpoint keeps only the adapters: the base must come back from init_from on resume.
            if not init_from:
                raise ValueError("model.lora needs model.init_from: the released weights the adapters adapt")
            if ema:
                raise ValueError("model.ema is not supported with model.lora: set model.ema=null")
            self.init_from_path = str(Path(init_from).resolve())
            self.init_from_ema = init_from_ema
            self.strict_loading = False  # the checkpoint's state dict holds the adapters only
        apply_trainable(self.trainable, self.unet, self.text_model, self.lora)
        if text_encoder_lr is not None and not self.trains_text_encoder:
            raise ValueError(
                f"model.text_encoder_lr is set but the text encoder is frozen (model.trainable="
                f"{self.trainable}; train it with unet+text_encoder or model.lora.text_encoder_targets)"
            )
        if self.trainable == "lora":
            self.base_checksum = frozen_checksum(self.unet, self.conditioner, self.autoencoder)

    @property
    def text_model(self) -> nn.Module | None:
        """The conditioner's CLIP text model (None for a class conditioner)."""
        return getattr(self.conditioner, "transformer", None)

    @property
    def trains_text_encoder(self) -> bool:
        from ldm.adapters.lora import has_lora

        return self.trainable == "unet+text_encoder" or has_lora(self.text_model)

    def train(self, mode: bool = True) -> LatentDiffusionSystem:
        """Only the UNet trains; the autoencoder and conditioner stay in eval (no dropout, frozen norms),
        unless the text encoder is trained too (model.trainable)."""
        super().train(mode)
        self.autoencoder.eval()
        if not self.trains_text_encoder:
            self.conditioner.eval()
        return self

    def load_weights_from(self, path: str, use_ema: bool = False) -> None:
        """Initialize UNet, autoencoder and text encoder from anything `ldm.load_pipeline` reads.

        A file holding both trained and EMA UNet weights (a "full" CompVis checkpoint, a run's last.ckpt)
        gives the trained ones unless `use_ema`: fine-tuning continues the optimized weights, the EMA copy
        is for sampling (CompVis/stable-diffusion README, Stability-AI/generative-models `sgm` configs).
        Files with one copy (EMA-only releases, our exports) give that copy either way."""
        from ldm.pipeline_io import load_pipeline

        # A single file carries no tokenizer; the text encoder's vocabulary is the conditioner's own.
        tokenizer = getattr(getattr(self.conditioner, "tokenizer", None), "name_or_path", None)
        pipe = load_pipeline(path, use_ema=use_ema, tokenizer=tokenizer)
        self.unet.load_state_dict(pipe.unet.state_dict())
        self.autoencoder.load_state_dict(pipe.vae.state_dict())
        self.autoencoder.scale_factor = pipe.vae.scale_factor
        if hasattr(self.conditioner, "transformer"):
            self.conditioner.load_state_dict(pipe.text_encoder.state_dict())

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> scaled latents z0, in fp32 whatever the autocast (SD's VAE overflows fp16)."""
        with torch.autocast(self.device.type, enabled=False):
            posterior = self.autoencoder.encode(images.float())
            if not self.sample_posterior:
                z = posterior.mode()
            elif generator is None or generator.device == posterior.mean.device:
                z = posterior.sample(generator)
            else:  # e.g. validation's CPU generator on a GPU: draw where the generator lives, then move
                noise = torch.randn(posterior.mean.shape, generator=generator, device=generator.device)
                z = posterior.mean + posterior.std * noise.to(posterior.mean)
        return z * self.autoencoder.scale_factor

    def latents(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """Scaled z0 of a batch: encoded from its images, or from a latent cache's posterior mean and std
        (ldm.data.latent_cache), drawing the same posterior noise from `generator` as `encode` would."""
        if "latent_mean" not in batch:
            return self.encode(batch["image"], generator)
        z = batch["latent_mean"].to(self.device, torch.float32)
        if self.sample_posterior:
            std = batch["latent_std"].to(z)
            if generator is None or generator.device == z.device:
                noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            else:
                noise = torch.randn(z.shape, generator=generator, device=generator.device).to(z)
            z = z + std * noise
        return z * self.autoencoder.scale_factor

    def step_generator(self) -> torch.Generator:
        """The randomness of one training batch (noise, timesteps, caption dropout, posterior sample),
        seeded from (seed, rank, optimizer step, micro-batch): a step is a function of weights and batch
        alone, so a resumed run repeats the uninterrupted one exactly, and ranks draw different noise."""
        micro = 0
        if self._trainer is not None:
            progress = self.trainer.fit_loop.epoch_loop.batch_progress
            micro = progress.current.ready % self.trainer.accumulate_grad_batches
        key = ((self.seed * 1_000_003 + self.global_step) * 64 + micro) * 4_099 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(key)

    def conditioning(self, batch: dict, drop: bool, generator: torch.Generator | None = None) -> Tensor:
        """Cross-attention context; with `drop`, each sample's condition becomes the unconditional one with
        probability ucg_rate (caption "" / the null class), which classifier-free guidance needs."""
        if "context" in batch:  # cached contexts, with the empty caption's for dropout
            if self.trains_text_encoder:
                raise ValueError(
                    f"data.cache_latents=true stores fixed text embeddings: model.trainable={self.trainable} "
                    "trains the text encoder; turn one of them off"
                )
            context = batch["context"].to(self.device)
            if drop and self.ucg_rate > 0:
                # The draws of the on-the-fly branch below, on the device: no host-device sync.
                keep = torch.rand(len(context), generator=generator, device=self.device) >= self.ucg_rate
                null = batch["uncond_context"].to(context)
                context = torch.where(keep[:, None, None], context, null)
            return context
        cond = batch[self.cond_key]
        n = len(cond)
        cond = cond.to(self.device) if isinstance(cond, Tensor) else list(cond)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_text_encoder):
            context = self.conditioner(cond)
            if drop and self.ucg_rate > 0:
                # Chosen on the device and blended there: no host-device sync in the training step.
                keep = torch.rand(n, generator=generator, device=self.device) >= self.ucg_rate
                null = self.conditioner.unconditional(n)  # context of the null condition ("" / null class)
                return torch.where(keep[:, None, None], context, null.to(context))
            return context

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        g = self.step_generator()
        z0 = self.latents(batch, g)
        context = self.conditioning(batch, drop=True, generator=g)
        loss, t = self.loss_fn(self._unet_forward, z0, context.to(z0.dtype), generator=g)
        if "is_prior" in batch:  # DreamBooth batches: instance samples, then class samples
            mean, instance, prior = prior_preservation_loss(loss, batch["is_prior"], self.prior_loss_weight)
            self.log_dict(
                {"train/instance_loss": instance, "train/prior_loss": prior}, batch_size=z0.shape[0]
            )
        else:
            mean = loss.mean()
        # Not prog_bar=True: Lightning reads every progress-bar metric back after each batch (a device sync
        # per step); StepProgressBar shows train/loss from the callback metrics when it redraws.
        self.log("train/loss", mean, batch_size=z0.shape[0])
        if self.log_buckets_every_n_steps:  # joins the window once the step is taken (optimizer_step)
            self.loss_by_timestep.add(loss, t)
        if "skipped" in batch:
            skipped = batch["skipped"]
            for reason, count in skipped.items():
                self.log(f"data/skipped_{reason}", float(count), reduce_fx="sum", batch_size=1)
        return mean

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Step, then fold the new weights into the EMA (CompVis `ddpm.py` updates `model_ema` after each
        step in `on_train_batch_end`). Lightning calls this hook only for the micro-batches that step, so
        with gradient accumulation the EMA sees each optimizer step once; `on_before_zero_grad` would be
        one step late in Lightning 2.x, where zero_grad runs inside the next batch's closure. A step that
        the non-finite guard (ldm/training/nonfinite.py) skipped leaves the EMA as it is too, and its losses
        out of the timestep-bucket window."""
        step = self.global_step  # (the step being taken: the optimizer's step moves it on)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        skipped = getattr(self, "nonfinite_skipped", False)  # (set by the guard inside the step)
        if self.ema is not None and not skipped:
            self.ema.update(self.unet)
        self.loss_by_timestep.commit(keep=not skipped)
        # Every n steps (at steps n-1, 2n-1, ...), the mean over those n steps; here, before the checkpoint
        # callbacks of the batch's end, so that a checkpoint holds the window that follows what was logged.
        if (
            (n := self.log_buckets_every_n_steps)
            and (step + 1) % n == 0
            and (buckets := self.loss_by_timestep.pop())
        ):
            self.log_dict({f"train/loss_{k}": v for k, v in buckets.items()}, on_step=True, on_epoch=False)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The UNet holds the EMA weights inside the block (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        with self.ema.average_parameters(self.unet):
            yield

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed posterior sample, noise and timesteps per batch, none drawn from the global RNG: the
        # validation loss of one evaluation is comparable with the next. A CPU generator: the same draws
        # on any device.
        g = torch.Generator().manual_seed(batch_idx)
        with self.ema_weights():
            z0 = self.latents(batch, g)
            context = self.conditioning(batch, drop=False)
            loss, _ = self.loss_fn(self.unet, z0, context.to(z0.dtype), generator=g)
        self.log("val/loss", loss.mean(), prog_bar=True, batch_size=z0.shape[0], sync_dist=True)

    def configure_optimizers(self) -> Any:
        from ldm.adapters.policy import param_groups

        params = param_groups(self.trainable, self.unet, self.text_model, self.text_encoder_lr)
        factory = self.optimizer_factory
        fusable = getattr(factory, "func", None) in (torch.optim.AdamW, torch.optim.Adam)
        # Not under mixed precision: Lightning's AMP plugin refuses gradient clipping with an optimizer that
        # unscales internally (pytorch_lightning/plugins/precision/amp.py, `_optimizer_handles_unscaling`),
        # and with fp16's GradScaler the non-finite guard's dropped gradients leave the fused step's inf
        # checks empty (torch.amp.GradScaler.update asserts).
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        mixed = precision.endswith("-mixed") or precision in ("16", "bf16")
        if fusable and "fused" not in factory.keywords and self.device.type in ("cuda", "cpu") and not mixed:
            # One kernel for the whole update instead of a handful per tensor (CUDA; CPU since torch 2.4):
            # the small UNet's AdamW step (34M parameters, 2 threads) takes 27 ms instead of 70.
            factory = functools.partial(factory, fused=True)
        optimizer = factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The latent scale is an attribute, not a weight: keep it with the weights so the run loads alone.
        checkpoint["scale_factor"] = float(self.autoencoder.scale_factor)
        checkpoint["prediction_type"] = self.prediction_type
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint["loss_by_timestep"] = self.loss_by_timestep.state_dict()
        if self.trainable == "lora":
            # Adapters only (a few MB): the frozen base is init_from's, verified by checksum on resume.
            from ldm.adapters.policy import is_adapter_key

            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if is_adapter_key(k)
            }
            checkpoint["lora"] = dict(
                self.lora.to_dict(),
                init_from=self.init_from_path,
                init_from_ema=self.init_from_ema,
                base_checksum=self.base_checksum,
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        if "loss_by_timestep" in checkpoint:
            self.loss_by_timestep.load_state_dict(checkpoint["loss_by_timestep"])
        if self.trainable == "lora":
            self._check_lora_checkpoint(checkpoint)

    def _check_lora_checkpoint(self, checkpoint: dict) -> None:
        """The checkpoint must hold exactly this run's adapters, on the same base weights."""
        from ldm.adapters.policy import is_adapter_key

        info = checkpoint.get("lora")
        if info is None:
            raise ValueError("this checkpoint is not from a LoRA run (model.lora): it cannot resume one")
        expected = {k for k in self.state_dict() if is_adapter_key(k)}
        got = set(checkpoint["state_dict"])
        if expected != got:
            diff = sorted(expected ^ got)[:6]
            raise ValueError(f"LoRA checkpoint does not fit model.lora ({info}): differing keys {diff}")
        if abs(info["base_checksum"] - self.base_checksum) > 1e-6 * max(1.0, abs(self.base_checksum)):
            raise ValueError(
                f"model.init_from={self.init_from_path} gives other base weights than the run was trained "
                f"on ({info['init_from']}): the LoRA checkpoint holds only the adapters"
            )

    # ------------------------------------------------------------------ sampling and export
    def to_pipeline(self, use_ema: bool = True):
        """A sampling Pipeline sharing this system's modules (EMA weights copied in when asked)."""
        import copy

        from ldm.adapters.lora import merged_copy, remove_lora
        from ldm.pipeline import Pipeline

        unet = remove_lora(copy.deepcopy(self.unet), merge=True)  # LoRA: merged in, original key names
        if use_ema and self.ema is not None:
            self.ema.copy_to(unet)
        return Pipeline(
            unet.eval(),
            self.autoencoder,
            merged_copy(self.conditioner),
            self.schedule.to(device=self.device),
            self.prediction_type,
            sample_size=self.sample_size,
            recommended=self.sampling,
        )

    def export(
        self, path: str | Path, datamodule: Any = None, trainer: pl.Trainer | None = None
    ) -> Path | None:
        """Write the EMA model as our pipeline folder (loads with `ldm.load_pipeline` / `sample.py`)."""
        if trainer is not None and not trainer.is_global_zero:
            return None
        if datamodule is not None and hasattr(datamodule, "resolution"):
            self.sample_size = int(datamodule.resolution) // self.autoencoder.downsampling_factor
        if self.trainable == "lora":  # adapters only, in the kohya and diffusers/PEFT layouts
            from ldm.checkpoints.lora_files import export_lora

            info = dict(self.lora.to_dict(), base=self.init_from_path, base_ema=self.init_from_ema)
            return export_lora(path, self.unet, self.text_model, info)
        pipe = self.to_pipeline()
        out = pipe.save(path, format="ldm")
        if "single_file" in self.export_formats:  # A1111 / ComfyUI / from_single_file
            pipe.save(Path(path) / "model_single_file.safetensors", format="single_file")
        if "diffusers" in self.export_formats:  # StableDiffusionPipeline.from_pretrained
            pipe.save(Path(path) / "diffusers", format="diffusers")
        return out
