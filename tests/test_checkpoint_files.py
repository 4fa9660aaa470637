"""Checkpoint files in ldm.checkpoints: single files (split/join, EMA, pickle safety, atomic writes),
diffusers folders (loaded by diffusers' own `StableDiffusionPipeline`), and format detection.

Tiny components are built from configs with random weights (no downloads); diffusers is the oracle only.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.checkpoints import (
    UnsafeCheckpointError,
    atomic_write,
    detect_format,
    fit_clip_keys,
    join_state_dict,
    load_diffusers_folder,
    load_single_file,
    normalize_clip_keys,
    read_state_dict,
    save_diffusers_folder,
    save_single_file,
    split_state_dict,
    unet_config_from_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_config_from_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)

SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


def _random(sd):
    """Random values with the same shapes."""
    return {k: torch.randn(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny SD-shaped components: diffusers modules, ours (original layout), kwargs, tokenizer."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, norm_num_groups=32,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    text_config = CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=16, hidden_act="gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    text = CLIPTextModel(text_config).eval()
    unet.load_state_dict(_random(unet.state_dict()))
    vae.load_state_dict(_random(vae.state_dict()))
    tok_dir = tmp_path_factory.mktemp("tok")
    vocab = {
        "<|startoftext|>": 0,
        "<|endoftext|>": 1,
        "!": 2,
        "a</w>": 3,
        "b</w>": 4,
        "a": 5,
        "b": 6,
        "c</w>": 7,
    }
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    return argparse.Namespace(
        unet_module=unet, vae_module=vae, text_module=text, tokenizer=tokenizer, text_config=text_config,
        unet=unet_from_diffusers(unet.state_dict()), vae=vae_from_diffusers(vae.state_dict()),
        text=normalize_clip_keys(text.state_dict()),
        unet_kwargs=unet_config_from_diffusers(unet.config), vae_kwargs=vae_config_from_diffusers(vae.config),
    )  # fmt: skip


def _assert_same(a, b):
    """Same keys and values."""
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _full_components(tiny):
    """A "full" file: trained UNet, a distinct EMA, autoencoder, SD1 text encoder, extras."""
    return {
        "unet": tiny.unet,
        "unet_ema": {k: v + 1 for k, v in tiny.unet.items()},
        "vae": tiny.vae,
        "text_encoder": tiny.text,
        "other": {
            "betas": torch.linspace(0, 1, 10),
            "model_ema.decay": torch.tensor(0.999),
            "model_ema.num_updates": torch.tensor(3),
        },
    }


def test_split_join_round_trip_with_ema(tiny):
    """join -> split -> join is lossless, EMA names flattened as LitEma does."""
    components = _full_components(tiny)
    flat = join_state_dict(components)
    assert torch.equal(
        flat["model_ema.diffusion_modelinput_blocks00weight"],
        components["unet_ema"]["input_blocks.0.0.weight"],
    )
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in flat
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in flat
    parts, text_format = split_state_dict(flat)
    assert text_format == "clip"
    for name, sd in components.items():
        _assert_same(parts[name], sd)
    _assert_same(join_state_dict(parts), flat)


def test_open_clip_single_file_round_trip(tiny):
    """An SD2 text encoder goes to open_clip names and back unchanged."""
    text = {**tiny.text, "text_projection.weight": torch.randn(16, 32), "logit_scale": torch.tensor(4.6)}
    flat = join_state_dict({"unet": tiny.unet, "text_encoder": text}, text_encoder_format="open_clip")
    assert flat["cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"].shape == (96, 32)
    assert flat["cond_stage_model.model.text_projection"].shape == (32, 16)
    parts, text_format = split_state_dict(flat)
    assert text_format == "open_clip"
    _assert_same(parts["text_encoder"], text)
    _assert_same(join_state_dict(parts, text_encoder_format="open_clip"), flat)


def test_single_file_text_encoder_description(tiny, tmp_path):
    """A loaded file says which text layer and config its text encoder needs."""
    path = save_single_file(
        tmp_path / "sd2.safetensors",
        {"unet": tiny.unet, "text_encoder": tiny.text},
        text_encoder_format="open_clip",
    )
    loaded = load_single_file(path)
    assert loaded.text_encoder_format == "open_clip" and loaded.text_layer == "penultimate"
    assert loaded.text_encoder_config()["num_attention_heads"] == 1  # 64-wide heads unless told otherwise
    config = loaded.text_encoder_config(head_width=8)
    assert (
        config["hidden_act"] == "gelu"
        and config["num_hidden_layers"] == 3
        and config["num_attention_heads"] == 4
    )
    # The inferred config rebuilds a model the weights load into, with the same outputs.
    rebuilt = CLIPTextModel(CLIPTextConfig(**config, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    fitted, leftover = fit_clip_keys(loaded.components["text_encoder"], rebuilt.state_dict().keys())
    rebuilt.load_state_dict(fitted, strict=True)
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).last_hidden_state, tiny.text_module(ids).last_hidden_state)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_load_single_file_ema_choice(tiny, tmp_path, suffix):
    """use_ema picks the EMA for sampling, keeps both for fine-tuning."""
    components = _full_components(tiny)
    path = save_single_file(tmp_path / f"model{suffix}", components, global_step=7, metadata={"note": "x"})
    for_sampling = load_single_file(path)
    assert for_sampling.has_ema and "unet_ema" not in for_sampling.components
    _assert_same(for_sampling.components["unet"], components["unet_ema"])
    assert for_sampling.global_step == 7 and for_sampling.metadata["note"] == "x"
    for_training = load_single_file(path, use_ema=False)
    _assert_same(for_training.components["unet"], components["unet"])
    _assert_same(for_training.components["unet_ema"], components["unet_ema"])
    _assert_same(for_training.components["other"], components["other"])
    # EMA-only (as released): model.diffusion_model.* is the only UNet, whatever use_ema says.
    ema_only = save_single_file(tmp_path / f"ema_only{suffix}", {"unet": tiny.unet, "vae": tiny.vae})
    for use_ema in (True, False):
        loaded = load_single_file(ema_only, use_ema=use_ema)
        assert not loaded.has_ema and "unet_ema" not in loaded.components
        _assert_same(loaded.components["unet"], tiny.unet)


def test_old_sd1_text_keys_and_standalone_vae(tiny, tmp_path):
    """Old SD1 text keys, standalone VAE files, and non-SD files."""
    old = {f"cond_stage_model.transformer.{k.removeprefix('text_model.')}": v for k, v in tiny.text.items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(16)[None]
    old.update({f"model.diffusion_model.{k}": v for k, v in tiny.unet.items()})
    parts, _ = split_state_dict(old)
    _assert_same(parts["text_encoder"], tiny.text)

    vae_file = {**tiny.vae, "loss.logvar": torch.zeros(())}
    parts, text_format = split_state_dict(vae_file)
    assert text_format is None and set(parts["other"]) == {"loss.logvar"}
    _assert_same(parts["vae"], tiny.vae)

    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        load_single_file(tmp_path / "other.ckpt")


def test_pickled_objects_are_refused_unless_allowed(tiny, tmp_path):
    """Pickled objects are refused with a message naming the opt-in."""
    path = tmp_path / "pickled.ckpt"
    payload = {f"model.diffusion_model.{k}": v for k, v in tiny.unet.items()}
    torch.save(
        {"state_dict": payload, "hyper_parameters": argparse.Namespace(lr=1e-4), "global_step": 3}, path
    )
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True") as err:
        load_single_file(path)
    assert "argparse.Namespace" in str(err.value) and "arbitrary code" in str(err.value)
    with pytest.raises(UnsafeCheckpointError, match="ckpt_allow_pickle=true"):
        read_state_dict(path, opt_in="the config key ckpt_allow_pickle=true")
    loaded = load_single_file(path, allow_pickle=True)
    _assert_same(loaded.components["unet"], tiny.unet)
    assert loaded.global_step == 3
    # A corrupt file is reported as such, not as an unsafe one.
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot be read"):
        read_state_dict(tmp_path / "corrupt.ckpt")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    """Writes leave only the target; a crash leaves the old file intact."""
    target = tmp_path / "w.safetensors"
    save_single_file(target, {"vae": {"encoder.conv_in.weight": torch.ones(2)}})
    assert os.listdir(tmp_path) == ["w.safetensors"]

    def crash(tmp):
        """A writer that dies halfway."""
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash)
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert torch.equal(read_state_dict(target)[0]["first_stage_model.encoder.conv_in.weight"], torch.ones(2))


def _save_folder(tiny, path, **kwargs):
    """save_diffusers_folder with the tiny components."""
    return save_diffusers_folder(
        path, unet=tiny.unet, unet_kwargs=tiny.unet_kwargs, vae=tiny.vae, vae_kwargs=tiny.vae_kwargs,
        text_encoder=tiny.text, text_encoder_config=tiny.text_config, tokenizer=tiny.tokenizer,
        scheduler_config=SCHEDULER, **kwargs,
    )  # fmt: skip


def test_diffusers_folder_loads_in_diffusers_and_back(tiny, tmp_path):
    """diffusers' own pipeline loads and runs our folder; we read it back."""
    folder = _save_folder(tiny, tmp_path / "pipe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary folder left
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    _assert_same(pipe.unet.state_dict(), tiny.unet_module.state_dict())
    _assert_same(pipe.vae.state_dict(), tiny.vae_module.state_dict())
    _assert_same(pipe.text_encoder.state_dict(), tiny.text_module.state_dict())
    assert pipe.scheduler.config.steps_offset == 1 and type(pipe.scheduler).__name__ == "PNDMScheduler"
    image = pipe("a b", num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert image.shape == (1, 16, 16, 3)

    loaded = load_diffusers_folder(folder)
    _assert_same(loaded.unet, tiny.unet)
    _assert_same(loaded.vae, tiny.vae)
    _assert_same(loaded.text_encoder, tiny.text)
    assert loaded.unet_kwargs == tiny.unet_kwargs and loaded.vae_kwargs == tiny.vae_kwargs
    assert loaded.text_encoder_config["num_hidden_layers"] == 3 and loaded.sample_size == 8
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"
    assert CLIPTokenizer.from_pretrained(loaded.tokenizer_path)("a b").input_ids == [0, 3, 4, 1]
    with pytest.raises(FileExistsError):
        _save_folder(tiny, folder)


def test_folder_written_by_diffusers_bin_and_shards(tiny, tmp_path):
    """A folder saved by diffusers as sharded .bin files reads into our layout."""
    pipe = StableDiffusionPipeline(
        unet=tiny.unet_module, vae=tiny.vae_module, text_encoder=tiny.text_module, tokenizer=tiny.tokenizer,
        scheduler=PNDMScheduler.from_config(SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(tmp_path / "theirs", safe_serialization=False, max_shard_size="100KB")
    assert (tmp_path / "theirs" / "unet" / "diffusion_pytorch_model.bin.index.json").is_file()
    loaded = load_diffusers_folder(tmp_path / "theirs")
    _assert_same(loaded.unet, tiny.unet)
    _assert_same(loaded.vae, tiny.vae)
    _assert_same(loaded.text_encoder, tiny.text)


def test_penultimate_text_layer_is_diffusers_last_layer(tiny, tmp_path):
    """text_layer='penultimate' gives diffusers a model whose last layer is ours."""
    folder = _save_folder(tiny, tmp_path / "sd2", text_layer="penultimate")
    reloaded = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    assert reloaded.config.num_hidden_layers == 2
    fitted, _ = fit_clip_keys(load_diffusers_folder(folder).text_encoder, reloaded.state_dict().keys())
    assert len(fitted) == len(reloaded.state_dict())
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        full = tiny.text_module(ids, output_hidden_states=True)
        final_norm = getattr(tiny.text_module, "text_model", tiny.text_module).final_layer_norm
        torch.testing.assert_close(reloaded(ids).last_hidden_state, final_norm(full.hidden_states[-2]))


def test_detect_format(tiny, tmp_path):
    """Each format is recognized; other paths give clear errors."""
    folder = _save_folder(tiny, tmp_path / "pipe")
    assert detect_format(folder) == "diffusers"
    single = save_single_file(tmp_path / "sd.safetensors", {"vae": tiny.vae})
    assert detect_format(single) == "single_file"
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model: {}\n")
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    assert detect_format(run) == "ldm_run"
    assert detect_format(run / "checkpoints" / "last.ckpt") == "ldm_run"
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "missing.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        detect_format(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a checkpoint file"):
        detect_format(tmp_path / "notes.txt")


def test_maps_are_consistent_with_the_modules(tiny):
    # The same weights through our maps load strictly into the diffusers modules they came from.
    """Mapped weights load strictly into the diffusers modules."""
    tiny.unet_module.load_state_dict(unet_to_diffusers(tiny.unet), strict=True)
    tiny.vae_module.load_state_dict(vae_to_diffusers(tiny.vae), strict=True)
    fitted, leftover = fit_clip_keys(tiny.text, tiny.text_module.state_dict().keys())
    assert not leftover
    tiny.text_module.load_state_dict(fitted, strict=True)


def test_atomic_write_gives_normal_permissions(tmp_path):
    """Files written through a private temporary file end up with the umask's permissions, not 0600."""
    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "f.bin", lambda tmp: open(tmp, "wb").write(b"x"))
    finally:
        os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o644
