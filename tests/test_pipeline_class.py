"""Class-conditional LDMs (Rombach et al. 2022, Sec. 4.3): sampling by label or class name, guidance with the
null class, and export / reload in our folder and single-file formats."""

from __future__ import annotations

import pytest
import torch

import ldm
from ldm.checkpoints import load_single_file, save_single_file
from ldm.diffusion.schedule import NoiseSchedule
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.conditioners import ClassConditioner
from ldm.nn.unet import UNetModel
from ldm.pipeline import Pipeline
from ldm.pipeline_io import save_pipeline
from tests.tiny import UNET_KW, VAE_KW, randomize_

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    cond = randomize_(ClassConditioner(10, 32, class_names=NAMES), seed=4)
    unet = randomize_(UNetModel(**UNET_KW), seed=5)
    with torch.no_grad():
        unet.out[-1].weight.mul_(0.05)
    vae = randomize_(AutoencoderKL(**VAE_KW), seed=6)
    return Pipeline(unet, vae, cond.requires_grad_(False), NoiseSchedule(timestep_spacing=None), "epsilon", 8)


def sample(pipe: Pipeline, labels, **kwargs) -> torch.Tensor:
    args = dict(steps=4, seed=2, sampler="dpmpp_2m", guidance_scale=3.0, output="tensor")
    return pipe(labels=labels, **{**args, **kwargs})


def test_labels_by_index_or_name(pipe):
    by_name = sample(pipe, ["seven", "Three"])
    assert by_name.shape == (2, 3, 64, 64)
    assert torch.equal(by_name, sample(pipe, [7, "3"]))
    assert (sample(pipe, 7) - sample(pipe, 2)).abs().max() > 1e-3  # the label conditions the image
    # Guidance contrasts with the null class: no guidance gives another image.
    assert (sample(pipe, 7) - sample(pipe, 7, guidance_scale=1.0)).abs().max() > 1e-3


def test_wrong_inputs_are_errors(pipe, tiny_sd_folder):
    with pytest.raises(ValueError, match="unknown class 'eleven'.*seven"):
        sample(pipe, "eleven")
    with pytest.raises(ValueError, match="out of range"):
        sample(pipe, 10)
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        pipe("a photo of a seven", steps=2)
    with pytest.raises(ValueError, match="text-conditional"):
        ldm.load_pipeline(tiny_sd_folder)(labels=[3], steps=2)


@pytest.mark.parametrize("fmt", ["ldm", "single_file"])
def test_export_and_reload_give_the_same_images(pipe, tmp_path, fmt):
    path = save_pipeline(pipe, tmp_path / "model", fmt)
    again = ldm.load_pipeline(path)
    assert again.is_class_conditional and again.conditioner.class_names == NAMES
    assert again.text_encoder is None and again.tokenizer is None
    assert torch.equal(sample(again, "seven"), sample(pipe, "seven"))


def test_single_file_uses_the_compvis_class_embedder_key(pipe, tmp_path):
    """CompVis `ClassEmbedder` lives at `cond_stage_model.embedding.weight`, its table counting the null
    class; a file without our metadata (as CompVis writes it) loads with the same rows."""
    path = save_pipeline(pipe, tmp_path / "model.safetensors", "single_file")
    ckpt = load_single_file(path)
    assert set(ckpt.components["class_embedder"]) == {"embedding.weight"}
    assert ckpt.text_encoder_format is None and not ckpt.components["text_encoder"]
    bare = save_single_file(tmp_path / "compvis.safetensors", ckpt.components)
    again = ldm.load_pipeline(bare)
    assert again.conditioner.n_classes == 10 and again.conditioner.ucg
    assert torch.equal(sample(again, 7, height=64, width=64), sample(pipe, 7))


def test_diffusers_format_is_refused_with_the_alternatives(pipe, tmp_path):
    with pytest.raises(ValueError, match="'ldm' or 'single_file'"):
        save_pipeline(pipe, tmp_path / "folder", "diffusers")
    assert not (tmp_path / "folder").exists()
