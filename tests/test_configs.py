"""Every experiment composes from the real train.yaml, and what it sets is what the recipe says; every
network config instantiates (full-size ones on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from ldm.training.resolvers import register_resolvers
from tests.tiny import REPO

register_resolvers()
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))


def composed(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_experiments_are_the_ones_documented():
    assert EXPERIMENTS == ["ae_kl_f8", "digits", "digits_ae", "sd15_laion", "sd21_v_laion"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    laion = name in ("ae_kl_f8", "sd15_laion", "sd21_v_laion")
    cfg = composed(f"experiment={name}", *(["data.urls='/data/{00000..00009}.tar'"] if laion else []))
    assert cfg.task_name == name
    assert cfg.model._target_ and cfg.data._target_ and cfg.trainer._target_


def test_default_is_the_digits_experiment():
    cfg = composed()
    assert cfg.task_name == "digits"
    assert cfg.model._target_ == "ldm.systems.diffusion.LatentDiffusionSystem"
    assert cfg.data._target_ == "ldm.data.digits.DigitsDataModule"
    assert Path(cfg.model.autoencoder.path).is_file()  # the shipped digits_ae autoencoder


def test_sd_recipes():
    sd15 = composed("experiment=sd15_laion", "data.urls=x")
    assert sd15.model.optimizer.lr == 1e-4 and sd15.model.lr_scheduler.warmup_steps == 10000
    assert sd15.model.ucg_rate == 0.1 and sd15.model.ema.decay == 0.9999
    assert sd15.model.prediction_type == "epsilon" and sd15.model.unet.context_dim == 768
    assert sd15.trainer.strategy._target_.endswith("DDPStrategy")
    sd21 = composed("experiment=sd21_v_laion", "data.urls=x")
    assert sd21.model.prediction_type == "v_prediction" and sd21.data.resolution == 768
    assert sd21.model.unet.num_head_channels == 64 and sd21.model.conditioner.layer == "penultimate"
    with torch.device("meta"):
        unet = instantiate(sd21.model.unet)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    ae = composed("experiment=ae_kl_f8", "data.urls=x")
    assert ae.model.disc_start == 50001 and ae.model.loss.disc_weight == 0.5
    assert list(ae.model.optimizer.betas) == [0.5, 0.9] and ae.model.base_lr == 4.5e-6


def test_wrong_value_fails_at_start_up_with_the_key():
    cfg = composed("model.ucg_rate=1.5")
    with pytest.raises(Exception, match="ucg_rate"):
        instantiate(cfg.model)
