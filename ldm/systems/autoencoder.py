"""AutoencoderSystem: stage one of latent diffusion, the KL autoencoder trained with L1 + LPIPS + KL and a
patch GAN (Rombach et al. 2022, Sec. 3.1 and App. G; CompVis `ldm/models/autoencoder.py` `AutoencoderKL`
with `ldm/modules/losses/contperceptual.py`). The math lives in `ldm.losses`; this is wiring.

Step counting. With manual optimization Lightning's `global_step` counts every `optimizer.step()`, so once
the discriminator trains it grows by two per batch (and `trainer.max_steps`, `every_n_train_steps`
count those). `disc_start` and `ae_step` count autoencoder steps, i.e. batches, which is what CompVis'
`global_step` meant (one per batch with its two optimizers): the GAN is on for batch index >= disc_start.

After training, `measure_scale_factor` sets the latents' scale (1 / std, CompVis `scale_by_std`) and
`export` writes the autoencoder as one safetensors file (`ldm.checkpoints.save_autoencoder`) that
`ldm.checkpoints.load_autoencoder` reads back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.checkpoints.autoencoder_file import AUTOENCODER_FILE_NAME, save_autoencoder
from ldm.losses.autoencoder_loss import AutoencoderLoss
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.ema import EMA


def reconstruction_grid(x: Tensor, xrec: Tensor, max_images: int = 8, pad: int = 2) -> Tensor:
    """Inputs above their reconstructions, side by side: (3, 2H + 2pad, n(W + 2pad)) in [0, 1]."""
    n = min(max_images, x.shape[0])
    pairs = torch.cat([x[:n], xrec[:n]], dim=2).detach().float().clamp(-1, 1).add(1).div(2)
    pairs = F.pad(pairs, (pad, pad, pad, pad), value=1.0)
    return torch.cat(list(pairs), dim=2).cpu()


def _images(batch: Any, key: str) -> Tensor:
    """The image tensor of a batch: the data modules' dict, or a bare tensor / (tensor, ...) tuple."""
    if isinstance(batch, Mapping):
        return batch[key]
    return batch if isinstance(batch, Tensor) else batch[0]


def _set_scale_factor(autoencoder: AutoencoderKL, scale: float) -> None:
    """Update both the attribute used to scale latents and the config that exports record."""
    autoencoder.scale_factor = float(scale)
    autoencoder.config["scale_factor"] = float(scale)


class AutoencoderSystem(pl.LightningModule):
    """Trains `autoencoder` against `discriminator` with `loss`; two optimizers, manual optimization.

    optimizer / disc_optimizer: partial optimizers (Hydra `_partial_: true`) called as f(params, lr=...);
    disc_optimizer defaults to optimizer. lr = base_lr, times batch size x accumulation x devices x nodes
    when scale_lr (CompVis `main.py`); the batch size is `batch_size`, else the datamodule's `batch_size`.
    disc_start: autoencoder steps before the discriminator trains and the GAN term joins the loss; until
    then no discriminator step is taken and its weights and statistics stay as initialized.
    gradient_clip_val: max gradient norm of each optimizer's step (Lightning's Trainer option does not
    apply to manual optimization). ema_decay: keep an EMA of the autoencoder, used for validation,
    the scale factor and the export (None: no EMA).
    """

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        discriminator: nn.Module,
        loss: AutoencoderLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        disc_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        base_lr: float = 4.5e-6,
        scale_lr: bool = True,
        batch_size: int | None = None,
        disc_start: int = 50001,
        gradient_clip_val: float | None = None,
        ema_decay: float | None = None,
        sample_posterior: bool = True,
        num_val_images: int = 8,
        scale_factor_batches: int = 16,
        image_key: str = "image",
    ):
        super().__init__()
        self.save_hyperparameters(
            ignore=["autoencoder", "discriminator", "loss", "optimizer", "disc_optimizer"]
        )
        self.automatic_optimization = False
        self.autoencoder, self.discriminator, self.loss = autoencoder, discriminator, loss
        self.optimizer, self.disc_optimizer = optimizer, disc_optimizer or optimizer
        self.base_lr, self.scale_lr, self.batch_size = base_lr, scale_lr, batch_size
        self.disc_start = disc_start
        self.gradient_clip_val = gradient_clip_val
        self.ema = EMA(autoencoder, decay=ema_decay) if ema_decay else None
        self.sample_posterior = sample_posterior
        self.num_val_images, self.scale_factor_batches = num_val_images, scale_factor_batches
        self.image_key = image_key
        self.ae_step = 0  # autoencoder optimizer steps taken (= training batches); see the module doc
        self.scale_factor_measured = False
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))  # per image, then averaged
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_lpips = MeanMetric()
        self._ema_scope: contextlib.ExitStack | None = None

    # ----------------------------------------------------------------------------------------- optimizers
    def learning_rate(self) -> float:
        """base_lr, or with scale_lr base_lr x batch x accumulate_grad_batches x world size (CompVis)."""
        if not self.scale_lr:
            return self.base_lr
        dm = getattr(self.trainer, "datamodule", None)
        batch = self.batch_size or getattr(dm, "batch_size", None)
        if batch is None and dm is not None:
            batch = dict(getattr(dm, "hparams", {})).get("batch_size")
        if batch is None:
            raise ValueError(
                "AutoencoderSystem(scale_lr=True) needs the batch size: give the datamodule a `batch_size` "
                "attribute, pass batch_size=..., or set scale_lr=false to use base_lr as it is"
            )
        return self.base_lr * int(batch) * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def configure_optimizers(self):
        lr = self.learning_rate()
        # The autoencoder's optimizer also trains the loss's log-variance; the LPIPS network stays frozen.
        params = [p for p in chain(self.autoencoder.parameters(), self.loss.parameters()) if p.requires_grad]
        return [self.optimizer(params, lr=lr), self.disc_optimizer(self.discriminator.parameters(), lr=lr)]

    def _step(self, opt, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt.step()

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_ae, opt_d = self.optimizers()
        x = _images(batch, self.image_key)
        xrec, posterior = self.autoencoder(x, sample_posterior=self.sample_posterior)
        gan = self.ae_step >= self.disc_start

        # Autoencoder step. The toggle freezes the discriminator: D(x') only passes gradients back to x'.
        with self.toggled_optimizer(opt_ae):
            logits_fake = self.discriminator(xrec) if gan else None
            last_layer = self.autoencoder.decoder.last_layer
            loss, logs = self.loss.generator_loss(x, xrec, posterior, logits_fake, last_layer)
            self._step(opt_ae, loss)
        if gan:
            with self.toggled_optimizer(opt_d):
                logits_real, logits_fake = self.discriminator(x.detach()), self.discriminator(xrec.detach())
                d_loss, d_logs = self.loss.discriminator_loss(logits_real, logits_fake)
                self._step(opt_d, d_loss)
            logs.update(d_logs)
        self.ae_step += 1
        # Right after this batch's steps, so the EMA holds the last one too; not after a step that the
        # non-finite guard (ldm/training/nonfinite.py) skipped.
        if self.ema is not None and not getattr(self, "nonfinite_skipped", False):
            self.ema.update(self.autoencoder)
        logs["ae_step"] = torch.tensor(float(self.ae_step))
        b = x.shape[0]
        # Shown by StepProgressBar when it redraws; prog_bar=True would read it back every step (a sync).
        self.log("train/loss", logs.pop("loss"), batch_size=b)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=b)

    # ----------------------------------------------------------------------------------------- validation
    @property
    def val_metrics(self) -> tuple[str, ...]:
        """What validation logs (no `val/loss`): checkpoint monitors are checked against it at start-up."""
        lpips = ("val/lpips",) if self.loss.perceptual is not None else ()
        return ("val/rec_loss", "val/nll", "val/kl", "val/psnr", "val/ssim", *lpips)

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """Within the block the autoencoder holds its EMA weights (a no-op without EMA)."""
        if self.ema is None:
            return contextlib.nullcontext()
        return self.ema.average_parameters(self.autoencoder)

    def on_validation_epoch_start(self) -> None:
        self._ema_scope = contextlib.ExitStack()
        self._ema_scope.enter_context(self.ema_weights())

    def on_validation_epoch_end(self) -> None:
        if self._ema_scope is not None:
            self._ema_scope.close()
            self._ema_scope = None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = _images(batch, self.image_key)
        # The posterior mean: metrics of the deterministic encoding that stage two uses.
        xrec, posterior = self.autoencoder(x, sample_posterior=False)
        terms = self.loss.reconstruction_terms(x, xrec, posterior)
        b = x.shape[0]
        self.log("val/rec_loss", terms["rec"].mean(), batch_size=b, sync_dist=True)
        self.log("val/nll", terms["nll"], batch_size=b, sync_dist=True)
        self.log("val/kl", terms["kl"], batch_size=b, sync_dist=True)
        xrec = xrec.clamp(-1, 1)
        img, rec = (x.float() + 1) / 2, (xrec.float() + 1) / 2
        # update(), not forward(): the metrics are computed once, over the epoch, when logged.
        self.val_psnr.update(rec, img)
        self.val_ssim.update(rec, img)
        self.log("val/psnr", self.val_psnr, batch_size=b, prog_bar=True)
        self.log("val/ssim", self.val_ssim, batch_size=b)
        if self.loss.perceptual is not None:
            self.val_lpips.update(self.loss.perceptual(x, xrec))
            self.log("val/lpips", self.val_lpips, batch_size=b)
        if batch_idx == 0 and self.num_val_images > 0 and self.trainer.is_global_zero:
            self._log_grid(reconstruction_grid(x, xrec, self.num_val_images))

    def _log_grid(self, grid: Tensor) -> None:
        """Send the grid to loggers that take images (wandb, tensorboard); others (CSV) are skipped."""
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                # HWC uint8: wandb renders torch tensors through torchvision, which we do not require.
                hwc = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
                logger.log_image(key="val/reconstructions", images=[hwc], step=self.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                logger.experiment.add_image("val/reconstructions", grid, self.global_step)

    # ------------------------------------------------------------------------------------- checkpointing
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["autoencoder_system"] = {
            "ae_step": self.ae_step,
            "scale_factor": self.autoencoder.scale_factor,
            "scale_factor_measured": self.scale_factor_measured,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("autoencoder_system")
        if state is None:
            return
        self.ae_step = int(state["ae_step"])
        _set_scale_factor(self.autoencoder, state["scale_factor"])
        self.scale_factor_measured = bool(state["scale_factor_measured"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])

    # ------------------------------------------------------------------------------ scale factor, export
    def _train_loader(self, datamodule: Any = None) -> Iterable:
        trainer = self._trainer
        dm = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
        if dm is not None:
            return dm.train_dataloader()
        if trainer is not None and trainer.train_dataloader is not None:
            return trainer.train_dataloader
        raise ValueError("measure_scale_factor needs a dataloader, a datamodule or a trainer that has one")

    @torch.no_grad()
    def measure_scale_factor(
        self,
        n_batches: int | None = None,
        dataloader: Iterable | None = None,
        datamodule: Any = None,
        device: str | torch.device | None = None,
        seed: int = 0,
    ) -> float:
        """Set the autoencoder's scale_factor to 1 / std of posterior samples z ~ q(z|x) (CompVis
        `scale_by_std`, which uses one batch; here the std is pooled over `n_batches` batches of the train
        loader, default `scale_factor_batches`), with the weights that `export` writes. Returns it.

        `device`: where to encode (default: where the autoencoder is; Lightning moves it back to the CPU
        after fit, so `export` passes the trainer's device)."""
        n_batches = n_batches or self.scale_factor_batches
        loader = dataloader if dataloader is not None else self._train_loader(datamodule)
        ae = self.autoencoder
        home = next(ae.parameters()).device
        device = torch.device(device) if device is not None else home
        gen = torch.Generator(device=device).manual_seed(seed)
        count, total, total_sq = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        was_training = ae.training
        ae.to(device).eval()
        try:
            with self.ema_weights():
                for i, batch in enumerate(loader):
                    if i >= n_batches:
                        break
                    x = _images(batch, self.image_key).to(device, torch.float32)
                    z = ae.encode(x).sample(gen).double().cpu()
                    count, total, total_sq = count + z.numel(), total + z.sum(), total_sq + z.pow(2).sum()
        finally:
            ae.to(home).train(was_training)
        if count < 2:
            raise ValueError("measure_scale_factor: the loader gave no images")
        var = (total_sq - total * total / count) / (count - 1)  # unbiased, as torch.std in scale_by_std
        scale = float(1.0 / var.sqrt())
        _set_scale_factor(ae, scale)
        self.scale_factor_measured = True
        return scale

    def export(self, path: str | os.PathLike, datamodule: Any = None, trainer: Any = None) -> Path:
        """Write the autoencoder (EMA weights when kept) to `path` (.safetensors, or a folder that gets
        `autoencoder.safetensors`): bare `encoder.*`/`decoder.*` keys as released standalone VAEs, and
        the constructor kwargs with scale_factor as JSON in metadata "ldm.vae". The scale factor is
        measured first if it was not yet. Returns the file written (only rank zero writes)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / AUTOENCODER_FILE_NAME
        if not self.scale_factor_measured:
            device = trainer.strategy.root_device if trainer is not None else None
            self.measure_scale_factor(datamodule=datamodule, device=device)
        if trainer is not None and not trainer.is_global_zero:
            return path
        shadow = self.ema.shadow if self.ema is not None else None
        return save_autoencoder(self.autoencoder, path, ema_shadow=shadow, global_step=self.ae_step)
