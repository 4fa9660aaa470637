"""Our networks through both checkpoint formats and back, and our single file read by diffusers itself.

A narrow SD-shaped model (four resolution levels in UNet and autoencoder, as diffusers' single-file reader
assumes) with random weights everywhere: ours -> single file -> ours and ours -> diffusers folder -> ours
must be lossless, and `StableDiffusionPipeline.from_single_file` on our file must compute what we compute.
"""

from __future__ import annotations

import json

import pytest
import torch

from ldm.checkpoints import (
    fit_clip_keys,
    load_diffusers_folder,
    load_single_file,
    save_diffusers_folder,
    save_single_file,
)
from ldm.checkpoints.build import build_unet, build_vae, infer_unet_kwargs, infer_vae_kwargs
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.unet import UNetModel
from tests.tiny import (
    SCHEDULER,
    UNET_KW,
    UNET_KW_SD2,
    VAE_KW,
    randomize_,
    rel_err,
    text_conditioner,
    text_state,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    unet = randomize_(UNetModel(**UNET_KW), seed=1).eval()
    vae = randomize_(AutoencoderKL(**VAE_KW), seed=2).eval()
    return unet, vae, text_conditioner()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_infer_kwargs_from_weights(ours):
    unet, vae, _ = ours
    inferred = infer_unet_kwargs(unet.state_dict())
    assert inferred["channel_mult"] == UNET_KW["channel_mult"]
    assert sorted(inferred["attention_resolutions"]) == sorted(UNET_KW["attention_resolutions"])
    assert inferred["num_res_blocks"] == 2 and inferred["context_dim"] == 32
    assert infer_vae_kwargs(vae.state_dict())["ch_mult"] == VAE_KW["ch_mult"]


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_round_trip_is_lossless(ours, tmp_path, suffix):
    unet, vae, cond = ours
    path = tmp_path / f"model{suffix}"
    save_single_file(
        path, {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_state(cond)}
    )
    ckpt = load_single_file(path)
    assert_same_state(unet, build_unet(ckpt.components["unet"]))
    assert_same_state(vae, build_vae(ckpt.components["vae"]))
    cond2 = text_conditioner()
    fitted, leftover = fit_clip_keys(ckpt.components["text_encoder"], cond2.transformer.state_dict().keys())
    assert not leftover
    cond2.transformer.load_state_dict(fitted, strict=True)
    assert_same_state(cond, cond2)


def test_diffusers_folder_round_trip_is_lossless(ours, tmp_path):
    unet, vae, cond = ours
    save_diffusers_folder(
        tmp_path / "pipe", unet=unet.state_dict(), unet_kwargs=UNET_KW,
        vae=vae.state_dict(), vae_kwargs=VAE_KW,
        text_encoder=text_state(cond), text_encoder_config=cond.transformer.config, tokenizer=cond.tokenizer,
        scheduler_config=SCHEDULER,
    )  # fmt: skip
    folder = load_diffusers_folder(tmp_path / "pipe")
    unet2 = build_unet(folder.unet, folder.unet_kwargs)
    vae2 = build_vae(folder.vae, folder.vae_kwargs)
    assert_same_state(unet, unet2)
    assert_same_state(vae, vae2)
    assert vae2.scale_factor == pytest.approx(VAE_KW["scale_factor"])
    fitted, _ = fit_clip_keys(folder.text_encoder, cond.transformer.state_dict().keys())
    for k, v in cond.transformer.state_dict().items():
        assert torch.equal(fitted[k], v), k


@pytest.mark.parametrize("unet_kw", [UNET_KW, UNET_KW_SD2], ids=["sd1", "sd2"])
def test_single_file_we_write_loads_in_diffusers(tmp_path, unet_kw):
    """diffusers' own reader on our file: same UNet output, autoencoder encode/decode, text hidden states."""
    unet = randomize_(UNetModel(**unet_kw), seed=4).eval()
    vae = randomize_(AutoencoderKL(**VAE_KW), seed=5).eval()
    cond = text_conditioner()
    components = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_state(cond)}
    single = tmp_path / "model.safetensors"
    save_single_file(single, components)
    # diffusers reads the architecture from a config folder (offline: no hub); weights come from the file.
    # The folder's weights are deliberately different, so equal outputs prove the file's weights were used.
    decoy = {k: torch.zeros_like(v) for k, v in components["unet"].items()}
    save_diffusers_folder(
        tmp_path / "config", unet=decoy, unet_kwargs=unet_kw, vae=components["vae"], vae_kwargs=VAE_KW,
        text_encoder=components["text_encoder"], text_encoder_config=cond.transformer.config,
        tokenizer=cond.tokenizer, scheduler_config=SCHEDULER,
    )  # fmt: skip
    index = json.loads((tmp_path / "config" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(single), config=str(tmp_path / "config"), local_files_only=True,
        safety_checker=None, requires_safety_checker=False,
    )  # fmt: skip
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([7, 801]), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert rel_err(unet(x, t, ctx), pipe.unet(x, t, encoder_hidden_states=ctx).sample) < 1e-5
        img = torch.rand(1, 3, 64, 64) * 2 - 1
        assert rel_err(vae.encode(img).mean, pipe.vae.encode(img).latent_dist.mean) < 1e-5
        z = torch.randn(1, 4, 8, 8)
        assert rel_err(vae.decode(z), pipe.vae.decode(z).sample) < 1e-5
        ids = cond.tokenize(["a photo of the digit seven"])
        ours_h = cond(ids)
        theirs_h = pipe.text_encoder(ids).last_hidden_state
        assert rel_err(ours_h, theirs_h) < 1e-5
