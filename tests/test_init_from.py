"""`model.init_from` on a CompVis-style *full* checkpoint (trained and EMA UNet weights in one file): the
trained weights by default, the EMA copy with `init_from_ema`, offline from a single file without metadata."""

from functools import partial

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedule import NoiseSchedule
from ldm.systems.diffusion import LatentDiffusionSystem
from tests.tiny import REPO, randomize_, text_conditioner, text_state


def tiny(group: str, seed: int):
    return randomize_(instantiate(OmegaConf.load(REPO / f"configs/model/{group}/tiny.yaml")), seed=seed)


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    """A single .safetensors laid out as CompVis `LatentDiffusion.state_dict()` (ldm/models/diffusion/
    ddpm.py): `model.diffusion_model.*`, the `LitEma` buffers `model_ema.<name without dots>` of every
    trainable UNet parameter (ldm/modules/ema.py) with `model_ema.decay` / `num_updates`,
    `first_stage_model.*` and `cond_stage_model.transformer.*`. No metadata, no tokenizer."""
    unet, ema_unet, ae = tiny("unet", 1), tiny("unet", 2), tiny("autoencoder", 3)
    cond = text_conditioner()
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    for name, p in ema_unet.named_parameters():
        sd["model_ema." + f"diffusion_model.{name}".replace(".", "")] = p.detach()
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    sd |= {f"first_stage_model.{k}": v for k, v in ae.state_dict().items()}
    sd |= {f"cond_stage_model.transformer.{k}": v for k, v in text_state(cond).items()}
    path = tmp_path_factory.mktemp("full") / "full.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, unet.state_dict(), ema_unet.state_dict(), ae.state_dict(), text_state(cond)


def system(**kwargs) -> LatentDiffusionSystem:
    """The tiny system with weights of its own (other seeds than the checkpoint's)."""
    cond = instantiate(OmegaConf.load(REPO / "configs/model/conditioner/tiny.yaml"))
    randomize_(cond.transformer, seed=9)
    return LatentDiffusionSystem(
        tiny("unet", 7), tiny("autoencoder", 8), cond, NoiseSchedule(), DiffusionLoss,
        partial(torch.optim.AdamW, lr=1e-3), ema={"decay": 0.999}, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("use_ema", [False, True])
def test_init_from_a_full_checkpoint(full_checkpoint, use_ema):
    path, trained, ema, vae, text = full_checkpoint
    fresh = system().unet.state_dict()
    s = system(init_from=str(path), init_from_ema=use_ema)
    want = ema if use_ema else trained
    other = trained if use_ema else ema
    got = s.unet.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert any(not torch.equal(got[k], other[k]) for k in got)  # the two copies really differ
    assert any(not torch.equal(got[k], fresh[k]) for k in got)  # and differ from the system's own init
    for k, v in vae.items():
        assert torch.equal(s.autoencoder.state_dict()[k], v), k
    assert s.autoencoder.scale_factor == pytest.approx(0.18215)  # SD's, for a file that does not say
    cond = {k.removeprefix("transformer."): v for k, v in s.conditioner.state_dict().items()}
    for k, v in text.items():
        assert torch.equal(cond[k], v), k
    # The EMA that training keeps starts from the weights loaded.
    for k, v in s.ema.shadow.items():
        assert torch.equal(v, want[k])


def test_init_from_ema_is_off_by_default_in_the_configs():
    for name in ("digits", "sd15"):
        assert OmegaConf.load(REPO / f"configs/model/ldm/{name}.yaml").init_from_ema is False
