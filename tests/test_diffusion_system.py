"""LatentDiffusionSystem pieces that the end-to-end runs don't pin down: condition dropout for class
labels as well as captions, the per-step generator, and start-up checks."""

from functools import partial

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedule import NoiseSchedule
from ldm.nn.conditioners import ClassConditioner
from ldm.systems.diffusion import LatentDiffusionSystem
from tests.tiny import REPO


def system(conditioner, cond_key, ucg_rate=0.5, **kwargs):
    unet = instantiate(OmegaConf.load(REPO / "configs/model/unet/tiny.yaml"))
    ae = instantiate(OmegaConf.load(REPO / "configs/model/autoencoder/tiny.yaml"))
    return LatentDiffusionSystem(
        unet, ae, conditioner, NoiseSchedule(), DiffusionLoss, partial(torch.optim.AdamW, lr=1e-3),
        cond_key=cond_key, ucg_rate=ucg_rate, **kwargs,
    )  # fmt: skip


def test_class_label_dropout_uses_the_null_class():
    cond = ClassConditioner(10, 32)
    sys_ = system(cond, "label")
    labels = torch.arange(10).repeat(20)
    g = torch.Generator().manual_seed(0)
    context = sys_.conditioning({"label": labels}, drop=True, generator=g)
    null = cond.unconditional(1)[0]
    dropped = (context == null).all(dim=(1, 2))
    assert 0.35 < dropped.float().mean() < 0.65  # ucg_rate 0.5
    torch.testing.assert_close(context[~dropped], cond(labels)[~dropped])
    assert torch.equal(sys_.conditioning({"label": labels}, drop=False), cond(labels))


def test_caption_dropout_uses_the_empty_caption():
    cond = instantiate(OmegaConf.load(REPO / "configs/model/conditioner/tiny.yaml"))
    sys_ = system(cond, "caption", ucg_rate=0.5)
    captions = [f"a photo of the digit {w}" for w in ["one", "two"]] * 50
    context = sys_.conditioning({"caption": captions}, drop=True, generator=torch.Generator().manual_seed(1))
    empty = cond([""])[0]
    dropped = torch.isclose(context, empty).all(dim=(1, 2))
    assert 0.35 < dropped.float().mean() < 0.65


def test_mismatched_modules_fail_at_start_up():
    cond = ClassConditioner(10, 16)  # the tiny UNet wants a 32-wide context
    with pytest.raises(ValueError, match="context_dim"):
        system(cond, "label")
    with pytest.raises(ValueError, match="ucg_rate"):
        system(ClassConditioner(10, 32), "label", ucg_rate=1.0)
