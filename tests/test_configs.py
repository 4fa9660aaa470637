"""Every experiment composes from the real train.yaml, and what it sets is what the recipe says; every
network config instantiates (full-size ones on the meta device)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.training.resolvers import register_resolvers
from tests.tiny import REPO

register_resolvers()
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
MODEL_CONFIGS = sorted(
    f"{p.parent.name}/{p.stem}"
    for p in (REPO / "configs" / "model").glob("*/*.yaml")
    if p.parent.name != "lora"
)  # configs/model/lora/ holds settings (model.lora), not modules: tested with the policy below
LORA_CONFIGS = sorted(p.stem for p in (REPO / "configs" / "model" / "lora").glob("*.yaml"))
# Released parameter counts: SD1.5 UNet (CompVis v1-inference.yaml, "859.52 M params"), SD2.1 UNet
# (Stability-AI v2-inference-v.yaml, 865.91 M), KL-f8 (CompVis models/first_stage_models/kl-f8, 83.65 M),
# CLIP ViT-L/14 text model (openai/clip-vit-large-patch14, 123.06 M).
SD15_UNET, SD21_UNET, KL_F8, CLIP_L = 859_520_964, 865_910_724, 83_653_863, 123_060_480
# Overrides for what needs the network and nothing else: no Hub download of the CLIP weights or tokenizer
# (the architecture stays the config's `config:` block; the bundled tokenizer fits in its vocabulary), no
# ImageNet VGG16 file for LPIPS (random weights, same network).
NO_HUB = ["model.pretrained=false", "model.tokenizer=tiny"]
NO_HUB_LDM = ["model.conditioner.pretrained=false", "model.conditioner.tokenizer=tiny"]
NO_VGG = ["model.loss.perceptual.pretrained=false"]
OFFLINE = {  # by model config file or experiment
    "conditioner/clip_vit_l14": NO_HUB,
    "conditioner/openclip_vit_h14": NO_HUB,
    "ldm/sd15": NO_HUB_LDM,
    "ldm/sd21_v": NO_HUB_LDM,
    "autoencoder_system/kl_f8": NO_VGG,
    "sd15_laion": NO_HUB_LDM,
    "sd21_v_laion": NO_HUB_LDM,
    "ae_kl_f8": NO_VGG,
    "dreambooth_sd15": [*NO_HUB_LDM, "model.init_from=null"],  # the released file it fine-tunes: not here
    "digits_dreambooth": ["model.init_from=null"],  # a trained digits run: not here
    "lora_sd15": NO_HUB_LDM,
    "finetune_sd15": NO_HUB_LDM,
}
LAION = ("ae_kl_f8", "sd15_laion", "sd21_v_laion")
# SD-size configs, built with their parameters on the meta device.
FULL_SIZE = {"unet/sd15", "unet/sd21", "autoencoder/kl_f8", "autoencoder_system/kl_f8", "ldm/sd15"}
FULL_SIZE |= {"ldm/sd21_v", "conditioner/clip_vit_l14", "conditioner/openclip_vit_h14"}


def composed(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_experiments_are_the_ones_documented():
    assert EXPERIMENTS == [
        "ae_kl_f8", "digits", "digits_ae", "digits_dreambooth", "digits_lora", "dreambooth_sd15",
        "finetune_sd15", "lora_sd15", "sd15_laion", "sd21_v_laion",
    ]  # fmt: skip


def test_dreambooth_recipes():
    """diffusers' examples/dreambooth README: lr 5e-6, prior weight 1.0, 200 class images, 800 steps."""
    sd = composed("experiment=dreambooth_sd15")
    assert sd.model.optimizer.lr == 5e-6 and sd.model.prior_loss_weight == 1.0 and sd.model.ema is None
    assert sd.data.num_class_images == 200 and sd.trainer.max_steps == 800 and sd.data.batch_size == 1
    assert sd.model.lr_scheduler.warmup_steps == 0 and sd.model.ucg_rate == 0.0
    digits = composed("experiment=digits_dreambooth")
    assert digits.data.instance_prompt == "a photo of sks digit" and len(digits.data.class_prompt) == 10
    assert digits.data.cache_latents and digits.callbacks.best_checkpoint is None


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


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_model(cfg, full_size: bool):
    """cfg.model instantiated: SD-size ones with their parameters on the meta device (accelerate's
    `init_empty_weights`: no memory, no time; buffers such as the noise schedule stay real). SD's autoencoder
    is a file (`model.autoencoder.path`, no default); without its 335 MB of weights it is built from
    configs/model/autoencoder/kl_f8.yaml, the architecture that file holds."""
    autoencoder = cfg.model.get("autoencoder")
    if isinstance(autoencoder, DictConfig) and OmegaConf.is_missing(autoencoder, "path"):
        cfg.model.autoencoder = OmegaConf.load(REPO / "configs" / "model" / "autoencoder" / "kl_f8.yaml")
    if not full_size:
        return instantiate(cfg.model)
    with init_empty_weights():
        return instantiate(cfg.model)


def stated_count(option: str) -> int | None:
    """The exact parameter count a model config file states in its comments ("83,653,863 parameters")."""
    text = (REPO / "configs" / "model" / f"{option}.yaml").read_text()
    found = re.findall(r"(\d{1,3}(?:,\d{3})+) parameters", text)
    return int(found[0].replace(",", "")) if found else None


@pytest.mark.parametrize("option", MODEL_CONFIGS)
def test_every_model_config_instantiates(option):
    """Each file under configs/model/, composed as `model=<group>/<name>` through the real train.yaml (so its
    interpolations resolve), builds its module; a count a file states is the one it builds."""
    cfg = composed(f"model={option}", "~experiment", *OFFLINE.get(option, []))
    model = build_model(cfg, full_size=option in FULL_SIZE)
    assert isinstance(model, torch.nn.Module) and n_params(model) > 0
    if stated_count(option) is not None:
        assert n_params(model) == stated_count(option)


def test_released_parameter_counts():
    """The SD-size configs build the released networks."""
    cases = {"unet/sd15": SD15_UNET, "unet/sd21": SD21_UNET, "autoencoder/kl_f8": KL_F8}
    cases["conditioner/clip_vit_l14"] = CLIP_L
    for option, expected in cases.items():
        assert stated_count(option) == expected, option
        model = build_model(composed(f"model={option}", "~experiment", *OFFLINE.get(option, [])), True)
        assert n_params(model) == expected, option


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_instantiates(name):
    """The model of every experiment, composed through train.yaml, builds; the SD recipes build the released
    networks (their parts counted separately: the system also holds an EMA copy as buffers)."""
    overrides = [f"experiment={name}", *OFFLINE.get(name, [])]
    if name in LAION:
        overrides.append("data.urls='/data/{00000..00009}.tar'")
    cfg = composed(*overrides)
    if name in ("digits_lora", "lora_sd15", "finetune_sd15"):
        # Released-weights recipes load their base (model.init_from=PATH): without one a LoRA recipe stops
        # naming init_from, a full fine-tune builds from scratch (tests/test_experiments.py runs each end to
        # end on a tiny base).
        assert cfg.model.init_from is None
        if "sd15" in name:
            cfg.model.autoencoder.path = "???"  # the base's file: build_model uses the kl_f8 architecture
        if cfg.model.get("lora"):
            with pytest.raises(Exception, match="model.lora needs model.init_from"):
                build_model(cfg, full_size="sd15" in name)
            return
    model = build_model(cfg, full_size=name in LAION or "sd15" in name)
    assert isinstance(model, torch.nn.Module)
    if name in ("sd15_laion", "dreambooth_sd15"):
        assert n_params(model.unet) == SD15_UNET and n_params(model.conditioner) == CLIP_L
    if name == "sd21_v_laion":
        assert n_params(model.unet) == SD21_UNET and model.conditioner.output_dim == 1024
    if name in ("sd15_laion", "sd21_v_laion", "ae_kl_f8", "dreambooth_sd15"):
        assert n_params(model.autoencoder) == KL_F8
    if name == "ae_kl_f8":
        assert n_params(model.discriminator) == 2_765_633  # CompVis NLayerDiscriminator(3 layers, ndf 64)
    if name.startswith("digits"):
        assert all(p.device.type == "cpu" for p in model.parameters())  # built for real, tiny


@pytest.mark.parametrize("name", LORA_CONFIGS)
def test_every_lora_config_adapts_the_sd15_unet(name):
    """Each LoRA settings file, composed as the LoRA experiment does, selects layers of the SD1.5 UNet and
    CLIP ViT-L/14 (built on the meta device) and gives the adapter size it says."""
    from ldm.adapters.policy import LoraSettings, apply_trainable

    cfg = composed("experiment=lora_sd15", f"model/lora={name}", "model.init_from=x", "data.root=x")
    settings = LoraSettings.from_config(OmegaConf.to_container(cfg.model.lora))
    with init_empty_weights():
        unet = instantiate(cfg.model.unet)
        text = instantiate(OmegaConf.load(REPO / "configs/model/conditioner/tiny.yaml")).transformer
    apply_trainable("lora", unet, text if settings.text_encoder_targets else None, settings)
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert 0 < trained < 0.05 * sum(p.numel() for p in unet.parameters())
