"""AutoencoderSystem: real Lightning training steps on CPU (discriminator start, clipping, EMA, logging),
validation metrics, scale factor, export -> load_autoencoder, and the Hydra configs."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from pytorch_lightning.loggers.logger import Logger
from safetensors import safe_open
from torch.utils.data import DataLoader

from ldm.checkpoints import (
    load_autoencoder,
    save_single_file,
    vae_config_to_diffusers,
    vae_to_diffusers,
    write_state_dict,
)
from ldm.losses import LPIPS, AutoencoderLoss, NLayerDiscriminator
from ldm.nn.autoencoder import AutoencoderKL
from ldm.systems.autoencoder import AutoencoderSystem, reconstruction_grid

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AE_KW = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=16, scale_factor=1.0)


def batches(n: int = 8, size: int = 16, batch_size: int = 2, seed: int = 0, contrast=None) -> DataLoader:
    """Batches in the data modules' contract: {"image": (B, 3, H, W) in [-1, 1], "caption": [...]}."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    if contrast is not None:  # per-image amplitudes, so that per-image errors differ widely
        images = images * torch.tensor(contrast).view(-1, 1, 1, 1)
    return DataLoader(
        [{"image": im, "caption": f"{i}"} for i, im in enumerate(images)], batch_size=batch_size
    )


class RandomImages(pl.LightningDataModule):
    def __init__(self, batch_size: int = 2):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return batches(batch_size=self.batch_size)

    def val_dataloader(self):
        return batches(n=4, batch_size=self.batch_size, seed=1)


class MemoryLogger(Logger):
    """Keeps logged metrics and images in lists; `log_image` as WandbLogger has it."""

    def __init__(self):
        super().__init__()
        self.metrics: list[dict] = []
        self.images: list = []

    name = property(lambda self: "memory")
    version = property(lambda self: 0)

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_image(self, key, images, step=None):
        self.images.append((key, images))


class TensorBoardLike(Logger):
    """No `log_image`; an `experiment` with `add_image`, as TensorBoardLogger's SummaryWriter."""

    def __init__(self):
        super().__init__()
        self.added: list = []

    name = property(lambda self: "tb")
    version = property(lambda self: 0)
    experiment = property(lambda self: self)

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def add_image(self, tag, img, step):
        self.added.append((tag, img))


def make_system(perceptual=None, **kw) -> AutoencoderSystem:
    torch.manual_seed(0)
    loss = AutoencoderLoss(perceptual, perceptual_weight=0.0, kl_weight=1e-6, disc_weight=0.5)
    defaults = dict(base_lr=1e-3, scale_lr=False, disc_start=2, num_val_images=4)
    return AutoencoderSystem(
        AutoencoderKL(**AE_KW),
        NLayerDiscriminator(ndf=8, n_layers=2),
        loss,
        optimizer=functools.partial(torch.optim.Adam, betas=(0.5, 0.9)),
        **{**defaults, **kw},
    )


def trainer(max_steps: int, callbacks=(), loggers=False, val_batches: int = 0) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=loggers, callbacks=list(callbacks),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=val_batches, log_every_n_steps=1,
    )  # fmt: skip


class Recorder(pl.Callback):
    """Discriminator/autoencoder weights after every batch, and gradient norms seen by each optimizer."""

    def __init__(self):
        self.disc, self.ae, self.grad_norms = [], [], []

    def on_train_batch_end(self, trainer, module, *args):
        self.disc.append({k: v.clone() for k, v in module.discriminator.state_dict().items()})
        self.ae.append([p.detach().clone() for p in module.autoencoder.parameters()])

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.grad_norms.append(torch.cat(grads).norm().item())


def test_discriminator_waits_for_disc_start_in_autoencoder_steps():
    """disc_start=2, max_steps=6: batches 0 and 1 step the autoencoder only (global_step 1, 2), batches 2
    and 3 both optimizers (global_step 4, 6): Lightning counts optimizer steps, disc_start counts batches."""
    system = make_system(disc_start=2, gradient_clip_val=0.01, ema_decay=0.5)
    rec = Recorder()
    init_d = {k: v.clone() for k, v in system.discriminator.state_dict().items()}
    init_ae = [p.detach().clone() for p in system.autoencoder.parameters()]
    logger = MemoryLogger()
    t = trainer(6, [rec], [logger])
    t.fit(system, datamodule=RandomImages())
    assert t.global_step == 6 and system.ae_step == 4 and len(rec.disc) == 4

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    # Weights and batch-norm statistics untouched before the start, trained after it.
    assert same(rec.disc[0], init_d) and same(rec.disc[1], init_d)
    assert not same(rec.disc[2], rec.disc[1]) and not same(rec.disc[3], rec.disc[2])
    assert not torch.equal(rec.disc[2]["main.0.weight"], init_d["main.0.weight"])
    for before, after in zip([init_ae, *rec.ae[:-1]], rec.ae):
        assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the autoencoder steps every batch
    # 4 autoencoder + 2 discriminator steps, each clipped to norm 0.01 (raw norms are far larger).
    assert len(rec.grad_norms) == 6
    assert all(0.0099 < n <= 0.01 * (1 + 1e-4) for n in rec.grad_norms)

    logged = {k for m in logger.metrics for k in m}
    expected = {
        "train/rec_loss",
        "train/kl",
        "train/nll",
        "train/g_loss",
        "train/d_weight",
        "train/disc_loss",
    }
    assert expected | {"train/logits_real", "train/logits_fake", "train/logvar", "train/loss"} <= logged
    gan_steps = [m for m in logger.metrics if "train/g_loss" in m]
    assert len(gan_steps) == 2  # the GAN terms appear from the third batch on

    # EMA: the shadow follows the weights but is not them; resuming restores it and the step count.
    ckpt: dict = {}
    system.on_save_checkpoint(ckpt)
    fresh = make_system(disc_start=2, ema_decay=0.5)
    fresh.on_load_checkpoint(ckpt)
    assert fresh.ae_step == 4 and fresh.ema.num_updates == 4
    name = "decoder.conv_out.weight"
    assert torch.equal(fresh.ema.shadow[name], system.ema.shadow[name])
    assert not torch.equal(system.ema.shadow[name], system.autoencoder.decoder.conv_out.weight)


def test_ema_averages_the_weights_after_each_step():
    """The EMA folds in each batch's weights right after its optimizer steps (manual optimization), from
    the initial weights, with CompVis LitEma's warm-up decay_t = min(decay, (1 + t) / (10 + t))."""
    decay = 0.5
    system = make_system(disc_start=1, ema_decay=decay)
    rec = Recorder()
    init = {k: p.detach().clone() for k, p in system.autoencoder.named_parameters()}
    trainer(7, [rec]).fit(system, datamodule=RandomImages())  # batch 0: autoencoder; 1-3: both
    assert system.ae_step == 4 and system.ema.num_updates == 4 and len(rec.ae) == 4
    names = list(init)
    for i, name in enumerate(names):
        expected = init[name]
        for t, weights in enumerate(rec.ae, start=1):
            d = min(decay, (1 + t) / (10 + t))
            expected = d * expected + (1 - d) * weights[i]
        torch.testing.assert_close(system.ema.shadow[name], expected, rtol=1e-5, atol=1e-7)


def test_learning_rate_scaling():
    system = make_system(base_lr=2e-4, scale_lr=True, disc_start=100)
    t = trainer(1)
    t.fit(system, datamodule=RandomImages(batch_size=4))
    # lr = base_lr x batch x accumulate (1) x devices (1), for both optimizers (CompVis main.py).
    assert [o.param_groups[0]["lr"] for o in t.optimizers] == [pytest.approx(8e-4)] * 2
    assert t.optimizers[0].param_groups[0]["betas"] == (0.5, 0.9)
    ae_params = {id(p) for p in t.optimizers[0].param_groups[0]["params"]}
    assert (
        id(system.loss.logvar) in ae_params
        and len(ae_params) == len(list(system.autoencoder.parameters())) + 1
    )
    system = make_system(scale_lr=True)
    with pytest.raises(ValueError, match="batch size"):
        trainer(1).fit(system, train_dataloaders=batches())


def test_validation_metrics_and_image_grids():
    lpips = LPIPS(pretrained=False)
    system = make_system(perceptual=lpips, ema_decay=0.9, disc_start=100)
    logger, tb = MemoryLogger(), TensorBoardLike()
    t = trainer(2, loggers=[logger, tb], val_batches=2)
    t.fit(system, train_dataloaders=batches())
    raw = [p.detach().clone() for p in system.autoencoder.parameters()]
    val = functools.partial(batches, n=4, seed=1, contrast=[1.0, 0.02, 0.3, 0.05])
    metrics = t.validate(system, dataloaders=val(), verbose=False)[0]

    # Recompute with the EMA weights, which validation uses (and then puts the trained ones back).
    assert all(torch.equal(a, b) for a, b in zip(raw, system.autoencoder.parameters()))
    psnr, ssim_in, dists = [], [], []
    with torch.no_grad(), system.ema_weights():
        for batch in val():
            x = batch["image"]
            xrec = system.autoencoder(x, sample_posterior=False)[0].clamp(-1, 1)
            img, rec = (x + 1) / 2, (xrec + 1) / 2
            psnr += (10 * torch.log10(1.0 / (img - rec).pow(2).mean(dim=(1, 2, 3)))).tolist()
            ssim_in.append((rec, img))
            dists += lpips(x, xrec).tolist()
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    ssims = [ssim(r, i, data_range=1.0, reduction="none") for r, i in ssim_in]
    assert metrics["val/psnr"] == pytest.approx(sum(psnr) / len(psnr), rel=1e-4)
    assert metrics["val/ssim"] == pytest.approx(torch.cat(ssims).mean().item(), rel=1e-4)
    assert metrics["val/lpips"] == pytest.approx(sum(dists) / len(dists), rel=1e-4)
    assert {"val/rec_loss", "val/nll", "val/kl"} <= set(metrics)

    key, (image,) = logger.images[-1]
    assert (
        key == "val/reconstructions"
        and image.dtype.name == "uint8"
        and image.shape == (2 * 16 + 4, 2 * 20, 3)
    )
    tag, grid = tb.added[-1]
    assert grid.shape == (3, 36, 40) and 0 <= grid.min() and grid.max() <= 1


def test_reconstruction_grid():
    x, xrec = -torch.ones(3, 3, 4, 5), torch.ones(3, 3, 4, 5)
    grid = reconstruction_grid(x, xrec, max_images=2, pad=1)
    assert grid.shape == (3, 2 * 4 + 2, 2 * (5 + 2))
    assert grid[:, 1:5, 1:6].eq(0).all() and grid[:, 5:9, 1:6].eq(1).all()  # input above reconstruction
    assert grid[:, 0].eq(1).all()  # padding is white


def test_measure_scale_factor_is_one_over_std():
    system = make_system(ema_decay=None)
    loader = batches(n=8, batch_size=2)
    scale = system.measure_scale_factor(n_batches=3, dataloader=loader, seed=5)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        z = torch.cat([system.autoencoder.encode(b["image"]).sample(gen) for b, _ in zip(loader, range(3))])
    assert scale == pytest.approx(1.0 / z.double().std().item(), rel=1e-6)
    assert system.autoencoder.scale_factor == scale and system.autoencoder.config["scale_factor"] == scale


def test_export_and_load_autoencoder_round_trip(tmp_path):
    system = make_system(ema_decay=0.9)
    with torch.no_grad():  # make the EMA differ from the weights: the export must hold the EMA
        for p in system.autoencoder.parameters():
            p.add_(torch.randn_like(p))
    path = system.export(tmp_path / "run_export", datamodule=RandomImages())
    assert path == tmp_path / "run_export" / "autoencoder.safetensors"
    scale = system.autoencoder.scale_factor
    assert scale != 1.0 and system.scale_factor_measured
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert json.loads(meta["ldm.vae"])["scale_factor"] == scale and meta["ldm.ema"] == "true"
    assert keys and all(
        k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys
    )

    vae = load_autoencoder(path)
    assert vae.scale_factor == scale and vae.config == system.autoencoder.config
    loaded = vae.state_dict()
    assert set(loaded) == set(system.ema.shadow)
    assert all(torch.equal(loaded[k], v) for k, v in system.ema.shadow.items())
    assert not torch.equal(loaded["decoder.conv_out.weight"], system.autoencoder.decoder.conv_out.weight)

    # Without EMA the trained weights themselves, bit for bit, through a .safetensors path as given.
    plain = make_system(ema_decay=None)
    plain.measure_scale_factor(n_batches=1, dataloader=batches())
    out = plain.export(tmp_path / "vae.safetensors")
    sd = load_autoencoder(out).state_dict()
    assert all(torch.equal(sd[k], v) for k, v in plain.autoencoder.state_dict().items())


def test_load_autoencoder_from_released_layouts(tmp_path):
    torch.manual_seed(3)
    vae = AutoencoderKL(**{**AE_KW, "resolution": 256, "scale_factor": 0.18215})
    sd = vae.state_dict()
    # An original SD single file: first_stage_model.* next to other components; no metadata -> 0.18215.
    save_single_file(tmp_path / "sd.safetensors", {"vae": sd, "other": {"alphas_cumprod": torch.ones(3)}})
    # A standalone VAE file as released (vae-ft-mse-840000-ema-pruned.ckpt: bare keys, loss.* kept).
    write_state_dict(tmp_path / "vae.ckpt", {**sd, "loss.logvar": torch.zeros(())}, global_step=840000)
    # A diffusers pipeline folder's vae/, with its own scaling factor.
    (tmp_path / "pipe" / "vae").mkdir(parents=True)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    config = vae_config_to_diffusers({**vae.config, "scale_factor": 0.13025})
    (tmp_path / "pipe" / "vae" / "config.json").write_text(json.dumps(config))
    write_state_dict(tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors", vae_to_diffusers(sd))

    cases = {"sd.safetensors": 0.18215, "vae.ckpt": 0.18215, "pipe": 0.13025, "pipe/vae": 0.13025}
    for name, scale in cases.items():
        got = load_autoencoder(tmp_path / name)
        assert got.scale_factor == pytest.approx(scale), name
        assert all(torch.equal(got.state_dict()[k], v) for k, v in sd.items()), name
    with pytest.raises(ValueError, match="no autoencoder"):
        write_state_dict(tmp_path / "other.safetensors", {"model.diffusion_model.x": torch.ones(1)})
        load_autoencoder(tmp_path / "other.safetensors")


def compose_model(option: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=None, overrides=[f"+model={option}", *overrides]).model


def test_tiny_config_composes_and_trains():
    cfg = compose_model("autoencoder_system/tiny", "model.disc_start=1")
    assert cfg.autoencoder._target_ == "ldm.nn.autoencoder.AutoencoderKL"  # the defaults entry's package
    system = instantiate(cfg)
    assert isinstance(system.autoencoder, AutoencoderKL) and system.loss.perceptual is None
    t = trainer(3)
    t.fit(system, train_dataloaders=batches(n=4, size=32))
    assert system.ae_step == 2 and t.optimizers[0].param_groups[0]["betas"][0] == 0.5


def test_kl_f8_config_is_the_released_recipe(monkeypatch):
    monkeypatch.delenv("LDM_VGG16", raising=False)
    cfg = compose_model("autoencoder_system/kl_f8")
    assert (cfg.disc_start, cfg.loss.disc_weight, cfg.loss.kl_weight, cfg.base_lr) == (
        50001,
        0.5,
        1e-6,
        4.5e-6,
    )
    assert cfg.scale_lr and list(cfg.optimizer.betas) == [0.5, 0.9] and cfg.loss.disc_loss == "hinge"
    with pytest.raises(InstantiationException, match="LDM_VGG16"):
        instantiate(cfg.loss.perceptual)
    # Full size on the meta device (no memory, no time): the released parameter counts.
    cfg = compose_model("autoencoder_system/kl_f8", "model.loss.perceptual.pretrained=false")
    with torch.device("meta"):
        system = instantiate(cfg)
    assert sum(p.numel() for p in system.autoencoder.parameters()) == 83_653_863
    assert sum(p.numel() for p in system.discriminator.parameters()) == 2_765_633
    assert isinstance(system.loss.perceptual, LPIPS) and system.autoencoder.scale_factor == 0.18215
    monkeypatch.setenv("LDM_VGG16", "/somewhere/vgg16.pth")
    assert compose_model("autoencoder_system/kl_f8").loss.perceptual.vgg16_path == "/somewhere/vgg16.pth"
