"""Every experiment (configs/experiment/*.yaml) runs end to end through `python train.py`: its recipe as
written (data pipeline, filters, strategy, precision, loggers, callbacks, schedules), with only the networks
shrunk to tiny sizes, the data pointed at digit shards and the step counts cut. Each leaves an export that
loads. And the start-up checks: data that does not fit the model, and a checkpoint monitor on a metric the
model never logs, stop the run before training with the keys to change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import ldm
from ldm.data.digits import prepare_digits
from tests.tiny import REPO
from tests.train_utils import run_train

EXPERIMENTS = sorted(p.stem for p in (REPO / "configs/experiment").glob("*.yaml"))
TINY_STEPS = ["trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]
# Messages a user can do nothing about (filtered in ldm/training/warnings.py, or fixed at the source).
NOISE = (
    "litlogger", "manual optimization", "module(s) in eval mode", "LeafSpec", "anonymous setting",
    "bucket view strides", "not supported by the model summary", "`IterableDataset` has `__len__`",
)  # fmt: skip


def assert_quiet(proc: subprocess.CompletedProcess) -> None:
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, noise


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Digit shards at 32 px (what the digits experiments read) and 64 px (SD-shaped runs: 8x8 latents)."""
    root = tmp_path_factory.mktemp("experiments") / "digits"
    for resolution in (32, 64):
        prepare_digits(root, resolution=resolution)
    return root


def urls(shards: Path, resolution: int, split: str) -> str:
    """A brace pattern over the split's shards, quoted for Hydra as the README shows it."""
    names = sorted(p.stem for p in (shards / f"{resolution}px" / split).glob("*.tar"))
    return f"'{shards}/{resolution}px/{split}/{{{names[0]}..{names[-1]}}}.tar'"


def load_autoencoder_file(path: Path):
    """Load an exported autoencoder the way stage two does: through the digits model's `autoencoder` node."""
    node = OmegaConf.load(REPO / "configs/model/ldm/digits.yaml").autoencoder
    node.path = str(path)
    return instantiate(node)


def sd_overrides(experiment: str, shards: Path, sd_folder: Path) -> list[str]:
    """An SD recipe with tiny networks: the tiny UNet, and the tiny SD-shaped diffusers folder's f=8
    autoencoder and CLIP text encoder (local files, as offline users pass them)."""
    return [
        f"experiment={experiment}", "model/unet=tiny", f"model.autoencoder.path={sd_folder}",
        f"model.conditioner.version={sd_folder}", "model.conditioner.subfolder=text_encoder",
        "model.conditioner.config=null",  # the tiny encoder's architecture, from its folder
        f"data.urls={urls(shards, 64, 'train')}", f"data.val_urls={urls(shards, 64, 'val')}",
        "data.resolution=64", "model.sample_size=8", "data.filters.min_size=64", "data.batch_size=2",
        "data.num_workers=0", "data.shuffle_buffer=16",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.steps=2", *TINY_STEPS,
    ]  # fmt: skip


def test_every_experiment_has_a_run_here():
    assert EXPERIMENTS == [
        "ae_kl_f8", "digits", "digits_ae", "digits_dreambooth", "digits_lora", "dreambooth_sd15",
        "finetune_sd15", "lora_sd15", "sd15_laion", "sd21_v_laion",
    ]  # fmt: skip


def test_digits(shards, tmp_path):
    run = tmp_path / "digits"
    proc = run_train(
        run, "experiment=digits", f"paths.data_dir={shards.parent}", "data.batch_size=8",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.sample_grid.every_n_steps=2",
        "callbacks.sample_grid.steps=2", "callbacks.sample_grid.n_per_prompt=1", *TINY_STEPS,
    )  # fmt: skip
    ckpts = {p.name for p in (run / "checkpoints").glob("*.ckpt")}
    assert {"last.ckpt", "step0000002.ckpt"} <= ckpts
    assert any(n.startswith("best-step0000002-") for n in ckpts)  # by val/loss
    assert (run / "samples" / "step_0000002.png").is_file()
    assert_quiet(proc)
    images = ldm.load_pipeline(run / "export")("a photo of the digit one", steps=2, seed=0, output="tensor")
    assert images.shape == (1, 3, 32, 32)


def test_digits_ae_exports_an_autoencoder_stage_two_loads(shards, tmp_path):
    """Validation on, the discriminator joining, the best checkpoint kept by val/psnr, the export loadable."""
    run = tmp_path / "digits_ae"
    proc = run_train(
        run, "experiment=digits_ae", f"paths.data_dir={shards.parent}", "data.batch_size=8",
        "model.disc_start=2", "trainer.max_steps=6", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "model.scale_factor_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=2", *TINY_STEPS,
    )  # fmt: skip
    assert f"run folder: {run.resolve()}" in proc.stdout  # printed first: where to look
    assert any(p.name.startswith("best-step") and "psnr" in p.name for p in (run / "checkpoints").iterdir())
    ae = load_autoencoder_file(run / "export" / "autoencoder.safetensors")
    assert ae.downsampling_factor == 4 and 0 < ae.scale_factor != 1.0  # measured at export
    assert_quiet(proc)


def test_ae_kl_f8(shards, tmp_path):
    """The released KL-f8 recipe (LPIPS, 3-layer PatchGAN, scaled LR, DDP, wandb) on a tiny autoencoder;
    the LPIPS trunk is random here (the ImageNet VGG16 file is not available offline)."""
    run = tmp_path / "ae_kl_f8"
    proc = run_train(
        run, "experiment=ae_kl_f8", "model/autoencoder=tiny", "model.loss.perceptual.pretrained=false",
        f"data.urls={urls(shards, 32, 'train')}", f"data.val_urls={urls(shards, 32, 'val')}",
        "data.resolution=32", "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=16",
        "trainer.accelerator=cpu", "trainer.devices=1", "model.disc_start=2", "trainer.max_steps=6",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "model.scale_factor_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=2", *TINY_STEPS,
    )  # fmt: skip
    assert any(p.name.startswith("best-step") for p in (run / "checkpoints").iterdir())
    assert list((run / "wandb").glob("offline-run-*"))
    assert_quiet(proc)
    ae = load_autoencoder_file(run / "export" / "autoencoder.safetensors")
    assert ae.downsampling_factor == 4


@pytest.mark.parametrize(
    "experiment, prediction", [("sd15_laion", "epsilon"), ("sd21_v_laion", "v_prediction")]
)
def test_sd_recipes(experiment, prediction, shards, tiny_sd_folder, tmp_path):
    run = tmp_path / experiment
    extra = []
    if experiment == "sd21_v_laion":  # SD2's UNet traits: head width instead of count, linear projections
        extra = ["model.unet.num_heads=-1", "model.unet.num_head_channels=16",
                 "model.unet.use_linear_in_transformer=true", "model.unet.upcast_attention=true"]  # fmt: skip
    proc = run_train(run, *sd_overrides(experiment, shards, tiny_sd_folder), *extra)
    assert_quiet(proc)  # here also wandb's, DDP's and bf16's
    ckpts = {p.name for p in (run / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in ckpts and any(n.startswith("best-step") for n in ckpts)
    assert (run / "samples" / "step_0000002.png").is_file()
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.ema.decay == 0.9999  # the recipe, kept
    pipe = ldm.load_pipeline(run / "export")
    assert pipe.prediction_type == prediction and pipe.sample_size == 8
    assert pipe("a photo of the digit two", steps=2, seed=0, output="tensor").shape == (1, 3, 64, 64)


def dreambooth_steps(run: Path) -> list[str]:
    """A DreamBooth run of 2 steps: 3 class images drawn in 2 sampler steps, cached with the instances."""
    return [
        f"data.class_root={run.parent / 'class'}", "data.num_class_images=3", "data.class_steps=2",
        "data.num_workers=0", "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.steps=2", *TINY_STEPS,
    ]  # fmt: skip


def test_digits_dreambooth(tmp_path):
    """From a digits-shaped model (random weights here, the default run's export in README): class images
    drawn by it, instance + class latents cached, the prior loss logged, an export that loads."""
    from ldm.data.dreambooth_digits import write_digit_instances
    from tests.test_init_from import system

    start = system().to_pipeline(use_ema=False)
    start.sample_size = 8
    start.save(tmp_path / "start")
    write_digit_instances(tmp_path / "data" / "dreambooth" / "sks_digit", digit=3, n=3)
    run = tmp_path / "run"
    proc = run_train(run, "experiment=digits_dreambooth", f"model.init_from={tmp_path / 'start'}",
                     f"paths.data_dir={tmp_path / 'data'}", *dreambooth_steps(run))  # fmt: skip
    assert_quiet(proc)
    assert len(list((tmp_path / "class").glob("class_*.png"))) == 3
    assert list((tmp_path / "data" / "dreambooth" / "sks_digit" / ".latent_cache").glob("*/images/*"))
    metrics = (next((run / "csv").glob("version_*")) / "metrics.csv").read_text()
    assert "train/prior_loss" in metrics and "train/instance_loss" in metrics
    pipe = ldm.load_pipeline(run / "export")
    assert pipe("a photo of sks digit", steps=2, seed=0, output="tensor").shape == (1, 3, 32, 32)


@pytest.mark.slow  # about a minute; the DreamBooth path itself runs in test_digits_dreambooth
def test_dreambooth_sd15(tiny_sd_folder, tmp_path):
    """The SD1.5 recipe (lr 5e-6, prior weight 1, bf16, no EMA) from the tiny SD-shaped folder."""
    from ldm.data.dreambooth_digits import write_digit_instances

    write_digit_instances(tmp_path / "instance", digit=3, n=2, resolution=64)
    run = tmp_path / "run"
    proc = run_train(
        run, "experiment=dreambooth_sd15", f"model.init_from={tiny_sd_folder}",
        # the folder's UNet (tests/tiny.py UNET_KW)
        "model.unet.model_channels=32", "model.unet.channel_mult=[1,2,2,2]", "model.unet.context_dim=32",
        f"model.autoencoder.path={tiny_sd_folder}", f"model.conditioner.version={tiny_sd_folder}",
        "model.conditioner.subfolder=text_encoder", "model.conditioner.config=null",
        f"data.instance_root={tmp_path / 'instance'}", "data.resolution=64", "model.sample_size=8",
        "trainer.accelerator=cpu", *dreambooth_steps(run),
    )  # fmt: skip
    assert_quiet(proc)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert cfg.model.optimizer.lr == 5e-6 and cfg.model.prior_loss_weight == 1.0 and cfg.model.ema is None
    assert len(list((tmp_path / "class").glob("class_*.png"))) == 3
    pipe = ldm.load_pipeline(run / "export")
    assert pipe("a photo of sks dog", steps=2, seed=0, output="tensor").shape == (1, 3, 64, 64)


def run_failing(tmp_path: Path, *overrides: str) -> str:
    """`python train.py ...` expected to stop at start-up: its stderr (without HYDRA_FULL_ERROR, as users
    see it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training
    return proc.stderr


def test_data_that_does_not_fit_the_model_stops_at_start_up(shards, tmp_path):
    """The digits model (8x8 latents) on 256 px shards: 64x64 latents at batch 64 (14 GB) without it."""
    data = ["data=webdataset", f"data.urls={urls(shards, 32, 'train')}", "data.resolution=256"]
    err = run_failing(tmp_path, *data)
    assert "data.resolution=256" in err and "model.sample_size=8" in err and "data.resolution=32" in err


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], ["'val/loss'", "val/psnr", "callbacks=autoencoder"]),  # the monitor of callbacks=ldm
        (["callbacks.best_checkpoint=null"], ["callbacks.sample_grid", "callbacks=autoencoder"]),
    ],
    ids=["monitor", "sample_grid"],
)
def test_callbacks_an_autoencoder_cannot_serve_stop_at_start_up(overrides, message, shards, tmp_path):
    """digits_ae with the latent diffusion callbacks: before, both failed after training (no val/loss to
    monitor; AutoencoderSystem has no to_pipeline to sample with)."""
    err = run_failing(
        tmp_path, "experiment=digits_ae", "callbacks=ldm", f"paths.data_dir={shards.parent}", *overrides
    )
    for part in message:
        assert part in err


# ------------------------------------------------------------------ fine-tuning from released weights
@pytest.fixture(scope="module")
def digits_base(tmp_path_factory) -> Path:
    """A digits-shaped model (the default experiment's networks, random UNet) saved as an export folder:
    what `python train.py` leaves in runs/digits/export, without the minutes of training."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ldm.training.resolvers import register_resolvers
    from tests.tiny import randomize_

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train")
    torch.manual_seed(0)
    system = instantiate(cfg.model)
    randomize_(system.unet, seed=5)
    return system.to_pipeline(use_ema=False).save(tmp_path_factory.mktemp("digits_base") / "export")


DIGITS_LORA = [
    "experiment=digits_lora", "data.batch_size=8", "trainer.max_steps=2", "trainer.val_check_interval=2",
    "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.sample_grid.every_n_steps=2",
    "callbacks.sample_grid.steps=2", "callbacks.sample_grid.n_per_prompt=1", "model.optimizer.lr=0.05",
    *TINY_STEPS,
]  # fmt: skip


@pytest.mark.slow  # ~15 s; adapter-only training through a real Trainer is in tests/test_lora.py (fast)
def test_digits_lora(shards, digits_base, tmp_path):
    """Adapters only: small checkpoints without the base, an export in both LoRA layouts that loads onto
    the base, and the run folder itself loading as base + adapters."""
    run = tmp_path / "digits_lora"
    proc = run_train(run, *DIGITS_LORA, f"model.init_from={digits_base}", f"paths.data_dir={shards.parent}")
    assert_quiet(proc)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in ckpt["state_dict"])
    assert ckpt["lora"]["init_from"] == str(digits_base.resolve()) and ckpt["lora"]["rank"] == 8
    export = run / "export"
    assert {p.name for p in export.iterdir()} == {
        "lora.safetensors",
        "pytorch_lora_weights.safetensors",
        "lora.json",
    }
    args = dict(prompt="a photo of sks digit", steps=3, seed=0, output="tensor")
    base = ldm.load_pipeline(digits_base)
    plain = base(**args)
    tuned = base.load_lora(export / "lora.safetensors")(**args)
    assert (tuned - plain).abs().max() > 1e-3  # the adapters were trained
    assert torch.equal(ldm.load_pipeline(run)(**args), tuned)  # the run: base + its adapters
    assert torch.equal(ldm.load_pipeline(digits_base).load_lora(export)(**args), tuned)  # the diffusers file


@pytest.mark.slow
def test_digits_lora_resumes_on_the_same_base_only(shards, digits_base, tmp_path):
    run = tmp_path / "digits_lora"
    common = [*DIGITS_LORA, f"paths.data_dir={shards.parent}"]
    run_train(run, *common, f"model.init_from={digits_base}")
    proc = run_train(run, *common, f"model.init_from={digits_base}", "trainer.max_steps=4", "resume=auto")
    assert "resuming from" in proc.stdout and (run / "checkpoints" / "step0000004.ckpt").is_file()
    other = tmp_path / "other_base"  # a different base under the same adapters: refused, not silently used
    pipe = ldm.load_pipeline(digits_base)
    with torch.no_grad():
        pipe.unet.out[-1].weight.add_(0.01)
    pipe.save(other)
    with pytest.raises(AssertionError, match="other base weights"):
        run_train(run, *common, f"model.init_from={other}", "trainer.max_steps=6", "resume=auto")


def sd_finetune_overrides(experiment: str, sd_folder: Path, images: Path) -> list[str]:
    """A released-weights recipe on the tiny SD-shaped diffusers folder (its UNet's shape: tests/tiny.py
    UNET_KW) and a folder of 64 px digit images."""
    return [
        f"experiment={experiment}", f"model.init_from={sd_folder}", "model/unet=tiny",
        "model.unet.channel_mult=[1,2,2,2]", "model.unet.attention_resolutions=[4,2,1]",
        "model.unet.num_res_blocks=2", "model.unet.num_heads=8",
        f"model.conditioner.version={sd_folder}", "model.conditioner.subfolder=text_encoder",
        "model.conditioner.config=null", f"data.root={images}", "data.resolution=64", "model.sample_size=8",
        "data.batch_size=2", "data.num_workers=0", "data.val_fraction=0.25", "trainer.accelerator=cpu",
        "trainer.devices=1", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.sample_grid.every_n_steps=2",
        "callbacks.sample_grid.steps=2", *TINY_STEPS,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory) -> Path:
    from ldm.data.digit_instance import prepare_digit_folder

    return prepare_digit_folder(tmp_path_factory.mktemp("images"), digit=7, resolution=64)


@pytest.mark.slow
def test_lora_sd15_export_loads_in_diffusers(tiny_sd_folder, digit_images, tmp_path):
    """A LoRA trained by the recipe, exported in both layouts, gives diffusers' StableDiffusionPipeline
    (load_lora_weights) the images our Pipeline.load_lora gives."""
    diffusers = pytest.importorskip("diffusers")
    run = tmp_path / "lora_sd15"
    proc = run_train(
        run, *sd_finetune_overrides("lora_sd15", tiny_sd_folder, digit_images), "model.optimizer.lr=0.05"
    )
    assert_quiet(proc)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    prompt = "a photo of the digit seven"
    plain = ldm.load_pipeline(tiny_sd_folder)(
        prompt, steps=3, sampler="ddim", latents=latents, output="tensor"
    )
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        ours = ldm.load_pipeline(tiny_sd_folder).load_lora(run / "export" / name)
        got = ours(prompt, steps=3, sampler="ddim", latents=latents, output="tensor")
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(
            tiny_sd_folder, safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
        theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
        theirs.set_progress_bar_config(disable=True)
        theirs.load_lora_weights(str(run / "export" / name))
        expected = theirs(prompt, latents=latents, num_inference_steps=3, guidance_scale=7.5, height=64,
                          width=64, output_type="pt").images  # fmt: skip
        assert (got - expected).abs().max().item() < 1e-3
        assert (got - plain).abs().max().item() > 1e-4  # the trained adapters change the images


@pytest.mark.slow
def test_finetune_sd15_exports_every_format(tiny_sd_folder, digit_images, tmp_path):
    run = tmp_path / "finetune_sd15"
    proc = run_train(run, *sd_finetune_overrides("finetune_sd15", tiny_sd_folder, digit_images))
    assert_quiet(proc)
    export = run / "export"
    args = dict(prompt="a photo of the digit seven", steps=2, seed=0, sampler="euler", output="tensor")
    ours = ldm.load_pipeline(export)(**args)
    for other in (export / "model_single_file.safetensors", export / "diffusers"):
        assert torch.equal(ldm.load_pipeline(other)(**args), ours)
    assert not torch.equal(ldm.load_pipeline(tiny_sd_folder)(**args), ours)  # fine-tuned
