"""One model, every format: SD2 single files in the open_clip layout, files that carry their tokenizer and
no path of the machine that wrote them, and the same images whichever format a model was loaded from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import ldm
from ldm.checkpoints import save_single_file
from ldm.diffusion.samplers import SAMPLERS
from ldm.diffusion.schedule import NoiseSchedule
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.conditioners import TextConditioner
from ldm.nn.unet import UNetModel
from ldm.pipeline import Pipeline
from ldm.pipeline_io import save_pipeline
from tests.tiny import UNET_KW, UNET_KW_SD2, VAE_KW, randomize_

diffusers = pytest.importorskip("diffusers")

PROMPT = "a photo of the digit five"
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (no timestep_spacing: each sampler's own).
SD_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
}  # fmt: skip
TEXT = dict(
    vocab_size=1024, intermediate_size=128, max_position_embeddings=77, layer_norm_eps=1e-5,
    pad_token_id=1023, bos_token_id=1022, eos_token_id=1023,
)  # fmt: skip


def tiny_pipe(sd2: bool, seed: int = 0, **unet_kw) -> Pipeline:
    """A random SD-shaped pipeline: SD1 (quick_gelu CLIP, last layer) or SD2 (gelu OpenCLIP, penultimate).

    The text encoder has 64-wide heads, as both SD text encoders do, so a file without our config can
    recover its architecture from the weights."""
    text = dict(TEXT, hidden_size=64, num_attention_heads=1, num_hidden_layers=3, projection_dim=64)
    text["hidden_act"] = "gelu" if sd2 else "quick_gelu"
    cond = TextConditioner(
        config=text, pretrained=False, tokenizer="tiny", layer="penultimate" if sd2 else "last"
    )
    randomize_(cond.transformer, seed=seed)
    unet_kw = dict(UNET_KW_SD2 if sd2 else UNET_KW, context_dim=64, **unet_kw)
    unet = randomize_(UNetModel(**unet_kw), seed=seed + 1)
    with torch.no_grad():
        unet.out[-1].weight.mul_(0.05)  # a well-conditioned sampling chain with random weights
    vae = randomize_(AutoencoderKL(**VAE_KW), seed=seed + 2)
    return Pipeline(unet, vae, cond, NoiseSchedule.from_diffusers_config(SD_SCHEDULER), "epsilon", 8)


def sample(pipe: Pipeline, sampler: str = "euler", **kwargs) -> torch.Tensor:
    args = dict(steps=4, seed=1, sampler=sampler, guidance_scale=3.0, height=64, width=64, output="tensor")
    return pipe(PROMPT, **{**args, **kwargs})


def file_keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def open_clip_names(layers: int) -> set[str]:
    """The text keys of a released SD2 file: open_clip `TextTransformer` (mlfoundations/open_clip
    `transformer.py`, `ResidualAttentionBlock`) under Stability's `cond_stage_model.model.`."""
    block = [
        "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
        "mlp.c_proj.weight", "mlp.c_proj.bias",
    ]  # fmt: skip
    names = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    names |= {f"transformer.resblocks.{i}.{k}" for i in range(layers) for k in block}
    return {"cond_stage_model.model." + n for n in names}


def test_sd2_single_file_is_written_in_the_open_clip_layout(tmp_path):
    pipe = tiny_pipe(sd2=True)
    path = save_pipeline(pipe, tmp_path / "sd2.safetensors", "single_file")
    keys = file_keys(path)
    text_keys = {k for k in keys if k.startswith("cond_stage_model.")}
    assert text_keys == open_clip_names(3)
    # diffusers' own SD2 reader (the oracle) turns the file back into our text encoder's exact weights.
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**pipe.text_encoder.transformer.config.to_dict())
    theirs = convert_open_clip_checkpoint(CLIPTextModel(config), load_file(str(path)))
    ours = {k.removeprefix("transformer."): v for k, v in pipe.text_encoder.state_dict().items()}
    assert set(theirs) == set(ours)
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key
    # ... and it samples as the model it was written from.
    assert torch.equal(sample(ldm.load_pipeline(path)), sample(pipe))


def test_sd1_single_file_keeps_the_transformers_layout(tmp_path):
    path = save_pipeline(tiny_pipe(sd2=False), tmp_path / "sd1.safetensors", "single_file")
    text_keys = {k for k in file_keys(path) if k.startswith("cond_stage_model.")}
    assert text_keys and all(k.startswith("cond_stage_model.transformer.text_model.") for k in text_keys)


def test_sd2_diffusers_folder_matches_diffusers_pipeline(tmp_path):
    """diffusers conditions on the last layer: the export drops the block after the penultimate one, and
    both our reload and diffusers' StableDiffusionPipeline give the original model's images."""
    pipe = tiny_pipe(sd2=True)
    folder = save_pipeline(pipe, tmp_path / "sd2", "diffusers")
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    expected = sample(pipe, "ddim")
    assert torch.equal(sample(ldm.load_pipeline(folder), "ddim"), expected)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    images = theirs(
        PROMPT, latents=latents, num_inference_steps=4, guidance_scale=3.0, height=64, width=64,
        output_type="pt",
    ).images  # fmt: skip
    assert (images - expected).abs().max().item() < 1e-3


def test_no_file_names_a_path_of_the_writing_machine(tmp_path):
    """A text encoder and tokenizer loaded from a local folder remember that folder (transformers'
    `_name_or_path`); none of the three formats may write it down."""
    pipe = tiny_pipe(sd2=False)
    source = tmp_path / "machine-specific-source-folder"
    pipe.text_encoder.save_pretrained(source)
    cond = TextConditioner(version=str(source), layer="last")
    assert str(source) in json.dumps(cond.transformer.config.to_dict())  # what must not leak
    local = Pipeline(pipe.unet, pipe.vae, cond, pipe.schedule, "epsilon", 8)
    written = [
        save_pipeline(local, tmp_path / "out" / "ldm", "ldm"),
        save_pipeline(local, tmp_path / "out" / "diffusers", "diffusers"),
        save_pipeline(local, tmp_path / "out" / "model.safetensors", "single_file"),
    ]
    files = [p for w in written for p in ([w] if w.is_file() else w.rglob("*")) if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        assert str(source).encode() not in data and str(tmp_path).encode() not in data, path


def test_single_file_samples_the_same_on_another_machine(tmp_path):
    """The tokenizer travels inside the file: with its source folder gone, the images are unchanged."""
    pipe = tiny_pipe(sd2=False)
    source = tmp_path / "tokenizer-only-here"
    pipe.text_encoder.save_pretrained(source)
    local = Pipeline(pipe.unet, pipe.vae, TextConditioner(version=str(source)), pipe.schedule, "epsilon", 8)
    path = save_pipeline(local, tmp_path / "model.safetensors", "single_file")
    expected = sample(local)
    shutil.rmtree(source)
    moved = tmp_path / "elsewhere" / "model.safetensors"
    moved.parent.mkdir()
    path.rename(moved)
    again = ldm.load_pipeline(moved)
    assert again.tokenizer.get_vocab() == local.tokenizer.get_vocab()
    assert torch.equal(sample(again), expected)


def test_single_file_without_a_findable_tokenizer_is_an_error(tmp_path):
    pipe = tiny_pipe(sd2=False)
    path = save_pipeline(pipe, tmp_path / "model.safetensors", "single_file")
    components = ldm.checkpoints.load_single_file(path).components
    meta = json.loads(ldm.checkpoints.load_single_file(path).metadata["ldm"])
    # Written by us without the tokenizer, or naming a folder of another machine: say what to pass.
    for extra in ({}, {"tokenizer": "/home/someone-else/tokenizer"}):
        metadata = {"ldm": json.dumps(meta | extra)}
        bare = save_single_file(tmp_path / "bare.safetensors", components, metadata=metadata)
        with pytest.raises((OSError, ValueError), match="tokenizer="):
            ldm.load_pipeline(bare)
    # Written elsewhere (no metadata): the family's released tokenizer, not cached and the Hub offline
    # (conftest sets HF_HUB_OFFLINE): an error at once, no other tokenizer.
    community = save_single_file(tmp_path / "community.safetensors", components)
    with pytest.raises(OSError, match="tokenizer=") as error:
        ldm.load_pipeline(community)
    assert "openai/clip-vit-large-patch14" in str(error.value) and "offline" in str(error.value).lower()
    # Passing one works.
    assert torch.equal(sample(ldm.load_pipeline(community, tokenizer="tiny")), sample(pipe))


def test_sd2_file_from_elsewhere_takes_the_sd2_pipeline_tokenizer(tmp_path):
    """Without metadata, an SD2 file's tokenizer is the `tokenizer/` subfolder of the SD2 pipeline repo
    (its pad token differs from OpenAI CLIP's), read from the Hugging Face cache without the network."""
    import os
    import subprocess
    import sys

    from ldm.nn.conditioners import tiny_tokenizer_path
    from tests.tiny import REPO

    pipe = tiny_pipe(sd2=True, model_channels=64, num_head_channels=64)  # SD2's 64-wide heads, as guessed
    text = {k.removeprefix("transformer."): v for k, v in pipe.text_encoder.state_dict().items()}
    parts = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(), "text_encoder": text}
    path = save_single_file(tmp_path / "sd2.safetensors", parts, text_encoder_format="open_clip")
    # A Hugging Face cache (huggingface_hub's layout) holding the SD2 pipeline's tokenizer/ only.
    repo = tmp_path / "hub" / "models--stabilityai--stable-diffusion-2-1"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_tokenizer_path(), repo / "snapshots" / ("0" * 40) / "tokenizer")
    code = (
        "import ldm, sys; p = ldm.load_pipeline(sys.argv[1], prediction_type='epsilon'); "
        "x = p(sys.argv[2], steps=4, seed=1, sampler='euler', guidance_scale=3.0, height=64, width=64, "
        "output='tensor'); print(len(p.tokenizer), repr(x.double().sum().item()))"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", code, str(path), PROMPT]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    size, checksum = proc.stdout.split()[-2:]
    assert int(size) == len(pipe.tokenizer) == 1024
    assert float(checksum) == sample(pipe).double().sum().item()  # the same images


def test_single_file_suffix_is_added(tmp_path):
    pipe = tiny_pipe(sd2=False)
    path = pipe.save(tmp_path / "my-model", format="single_file")
    assert path == tmp_path / "my-model.safetensors" and path.is_file()
    assert torch.equal(sample(ldm.load_pipeline(path)), sample(pipe))


@pytest.fixture(scope="module")
def both_formats(tmp_path_factory):
    """One model as a diffusers folder and as a single file without our metadata (as other tools write)."""
    root = tmp_path_factory.mktemp("formats")
    pipe = tiny_pipe(sd2=False, seed=5)
    folder = save_pipeline(pipe, root / "diffusers", "diffusers")
    text = {k.removeprefix("transformer."): v for k, v in pipe.text_encoder.state_dict().items()}
    parts = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(), "text_encoder": text}
    single = save_single_file(root / "community.safetensors", parts)
    return ldm.load_pipeline(folder), ldm.load_pipeline(single, tokenizer="tiny")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_same_images_from_single_file_and_diffusers_folder(both_formats, sampler):
    folder, single = both_formats
    assert single.schedule.timestep_spacing == folder.schedule.timestep_spacing is None
    a, b = sample(folder, sampler, steps=5), sample(single, sampler, steps=5)
    assert a.std() > 0.01
    assert torch.equal(a, b)
