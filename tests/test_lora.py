"""LoRA (ldm/adapters, ldm/checkpoints/lora_files.py) and the trainable-parameter policy of
LatentDiffusionSystem: adapters only train (the base stays bit-identical through a real Lightning fit),
merge / unmerge agree, our LoRA files give diffusers' StableDiffusionPipeline.load_lora_weights the same
images as our Pipeline.load_lora (kohya and diffusers/PEFT layouts), kohya files round-trip and are read in
other trainers' spellings, and a LoRA that does not fit the model is an error naming its layers."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

import ldm
from ldm.adapters import (
    TEXT_TARGETS,
    UNET_TARGETS,
    add_lora,
    has_lora,
    lora_parameters,
    lora_weights,
    merge_lora,
    remove_lora,
    target_names,
    unmerge_lora,
)
from ldm.checkpoints.lora_files import LoraFile, read_lora, save_diffusers, save_kohya
from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedule import NoiseSchedule
from ldm.nn.unet import UNetModel
from ldm.systems.diffusion import LatentDiffusionSystem
from tests.tiny import REPO, UNET_KW, randomize_

ALL_UNET = ["attn", "ff", "proj", "resnet"]


def random_lora(module, targets, table, rank=4, alpha=2.0, seed=0):
    """Adapters with non-zero A and B (what training leaves), as a trained LoRA would have them."""
    add_lora(module, target_names(module, targets, table), rank, alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(module):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([600]), torch.randn(1, 7, 32, generator=g)


def test_merged_and_unmerged_forwards_agree():
    unet = randomize_(UNetModel(**UNET_KW))
    x, t, c = unet_inputs()
    base = unet(x, t, c)
    plain = {k: v.clone() for k, v in unet.state_dict().items()}
    random_lora(unet, ALL_UNET, UNET_TARGETS)
    unmerged = unet(x, t, c)
    assert (unmerged - base).abs().max() > 0.1  # the adapters do something
    merge_lora(unet)
    torch.testing.assert_close(unet(x, t, c), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(unet)
    torch.testing.assert_close(unet(x, t, c), unmerged, atol=1e-5, rtol=0)
    remove_lora(unet, merge=False)  # the base again (to float rounding after a merge round trip)
    assert not has_lora(unet) and unet.state_dict().keys() == plain.keys()
    torch.testing.assert_close(unet(x, t, c), base, atol=1e-5, rtol=0)

    # Never merged: removing the adapters gives the base bit for bit, with its original key names.
    plain = {k: v.clone() for k, v in unet.state_dict().items()}
    random_lora(unet, ["attn"], UNET_TARGETS)
    remove_lora(unet, merge=False)
    assert unet.state_dict().keys() == plain.keys()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in plain.items())


def test_target_groups_and_unknown_targets():
    unet = UNetModel(**UNET_KW)
    attn = target_names(unet, ["attn"], UNET_TARGETS)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in attn
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0" in attn
    assert len(attn) == 8 * 16  # 16 transformer blocks, q/k/v/out of two attentions
    assert target_names(unet, ["attn2.to_k"], UNET_TARGETS) == [n for n in attn if n.endswith("attn2.to_k")]
    with pytest.raises(ValueError, match="'atn'"):
        target_names(unet, ["atn"], UNET_TARGETS)


@pytest.fixture
def lora_pipe(tiny_sd_folder):
    """The tiny SD-shaped pipeline with random adapters everywhere LoRA trainers put them."""
    pipe = ldm.load_pipeline(tiny_sd_folder)
    random_lora(pipe.unet, ALL_UNET, UNET_TARGETS, seed=1)
    random_lora(pipe.conditioner.transformer, ["attn", "mlp"], TEXT_TARGETS, rank=2, alpha=4.0, seed=2)
    return pipe


def lora_file(pipe) -> LoraFile:
    return LoraFile(lora_weights(pipe.unet), lora_weights(pipe.conditioner.transformer))


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_diffusers_load_lora_weights_gives_our_images(lora_pipe, tiny_sd_folder, tmp_path, layout):
    diffusers = pytest.importorskip("diffusers")
    lora = lora_file(lora_pipe)
    if layout == "kohya":
        path = save_kohya(tmp_path / "lora.safetensors", lora, lora_pipe.unet)
    else:
        path = save_diffusers(tmp_path, lora, lora_pipe.unet)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_sd_folder, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(path))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    prompt = "a photo of the digit seven"
    expected = theirs(prompt, latents=latents, num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                      output_type="pt").images  # fmt: skip
    ours = ldm.load_pipeline(tiny_sd_folder).load_lora(path, scale=1.0)
    args = dict(steps=4, guidance_scale=5.0, sampler="ddim", latents=latents, output="tensor")
    got = ours(prompt, **args)
    assert (got - expected).abs().max().item() < 1e-3
    assert (got - lora_pipe(prompt, **args)).abs().max().item() < 1e-5  # the pipeline the file came from
    base = ldm.load_pipeline(tiny_sd_folder)(prompt, **args)
    assert (got - base).abs().max().item() > 1e-2  # the LoRA changes the images


def test_kohya_round_trip_and_names(lora_pipe, tmp_path):
    lora = lora_file(lora_pipe)
    path = save_kohya(tmp_path / "lora.safetensors", lora, lora_pipe.unet)
    sd = load_file(path)
    # sd-scripts' SD1 names: diffusers module paths, dots -> underscores; CLIP paths for the text encoder.
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_unet_mid_block_attentions_0_proj_in.alpha" in sd
    assert "lora_unet_up_blocks_1_resnets_0_conv_shortcut.lora_up.weight" in sd
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in sd
    assert float(sd["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == 2.0
    back = read_lora(path, lora_pipe.unet, lora_pipe.conditioner.transformer)
    for ours, read in ((lora.unet, back.unet), (lora.text_encoder, back.text_encoder)):
        assert ours.keys() == read.keys()
        for name, w in ours.items():
            assert torch.equal(w.down, read[name].down) and torch.equal(w.up, read[name].up)
            assert w.alpha == read[name].alpha

    # Original-path (sgm) spellings, as kohya's SDXL scripts and some converters write them, read the same.
    name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    other = {
        f"lora_unet_{name.replace('.', '_')}.lora_down.weight": lora.unet[name].down,
        f"lora_unet_{name.replace('.', '_')}.lora_up.weight": lora.unet[name].up,
    }
    save_file(other, tmp_path / "sgm.safetensors")
    read = read_lora(tmp_path / "sgm.safetensors", lora_pipe.unet)
    assert list(read.unet) == [name] and read.unet[name].alpha == lora.unet[name].rank  # no alpha: = rank


def test_a_lora_that_does_not_fit_is_an_error_naming_its_layers(lora_pipe, tiny_sd_folder, tmp_path):
    lora = lora_file(lora_pipe)
    sd = load_file(save_kohya(tmp_path / "lora.safetensors", lora, lora_pipe.unet))
    sd["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
    save_file(sd, tmp_path / "partly.safetensors")
    pipe = ldm.load_pipeline(tiny_sd_folder)
    with pytest.raises(ValueError, match=r"1 of \d+ LoRA layers match no layer.*lora_unet_not_a_layer"):
        pipe.load_lora(tmp_path / "partly.safetensors")
    assert not has_lora(pipe.unet)  # nothing half-loaded
    save_file({"unet.nothing.here.lora_A.weight": torch.zeros(2, 3), "unet.nothing.here.lora_B.weight":
               torch.zeros(3, 2)}, tmp_path / "none.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match="unet.nothing.here"):
        pipe.load_lora(tmp_path / "none.safetensors")
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    bad = {f"{name}.lora_down.weight": torch.zeros(2, 5), f"{name}.lora_up.weight": torch.zeros(32, 2)}
    save_file(bad, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match="shapes do not fit.*self_attn.q_proj"):
        pipe.load_lora(tmp_path / "shape.safetensors")
    save_file({f"{name}.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    with pytest.raises(ValueError, match="not plain LoRA.*hada_w1_a"):
        pipe.load_lora(tmp_path / "loha.safetensors")
    assert not has_lora(pipe.unet) and not has_lora(pipe.conditioner)


def test_scale_fuse_unload_and_save(lora_pipe, tiny_sd_folder, tmp_path):
    path = save_kohya(tmp_path / "lora.safetensors", lora_file(lora_pipe), lora_pipe.unet)
    args = dict(prompt="a photo of the digit one", steps=3, seed=3, sampler="euler", output="tensor")
    base = ldm.load_pipeline(tiny_sd_folder)
    plain = base(**args)
    full = base.load_lora(path)(**args)
    # Scale 0 is the base to float rounding: with adapters on proj_in/proj_out the SpatialTransformer calls
    # them as modules (ldm.nn.attention), a different order of the same products than the bare weights.
    torch.testing.assert_close(base.set_lora_scale(0.0)(**args), plain, atol=1e-5, rtol=0)
    half = base.set_lora_scale(0.5)(**args)
    assert 0 < (half - plain).abs().max() < (full - plain).abs().max()
    base.save(tmp_path / "merged", format="ldm")  # saved with the LoRA merged in, original key names
    torch.testing.assert_close(ldm.load_pipeline(tmp_path / "merged")(**args), half, atol=1e-4, rtol=0)
    assert torch.equal(base.unload_lora()(**args), plain)
    torch.testing.assert_close(base.load_lora(path).fuse_lora()(**args), full, atol=1e-4, rtol=0)
    assert not has_lora(base.unet)


# ------------------------------------------------------------------ the trainable-parameter policy
def digits_system(**kwargs) -> LatentDiffusionSystem:
    unet = instantiate(OmegaConf.load(REPO / "configs/model/unet/tiny.yaml"))
    cond = instantiate(OmegaConf.load(REPO / "configs/model/conditioner/tiny.yaml"))
    ae = instantiate(OmegaConf.load(REPO / "configs/model/autoencoder/tiny.yaml"))
    return LatentDiffusionSystem(
        unet, ae, cond, NoiseSchedule(), DiffusionLoss, partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
        ucg_rate=0.1, sample_size=8, seed=0, **{"ema": None, **kwargs},
    )  # fmt: skip


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A digits-shaped model saved as our pipeline folder: the released weights the LoRA starts from."""
    torch.manual_seed(0)
    sys_ = digits_system()
    randomize_(sys_.unet, seed=4)
    return sys_.to_pipeline().save(tmp_path_factory.mktemp("base") / "export")


class Batches(pl.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        images = torch.rand(6, 4, 3, 16, 16, generator=g) * 2 - 1
        batches = [{"image": x, "caption": ["a photo of sks digit"] * 4} for x in images]
        return DataLoader(batches, batch_size=None)


def fit(system, steps=3):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(system, datamodule=Batches())
    return trainer


@pytest.mark.parametrize("text_targets", [[], ["attn"]], ids=["unet", "unet+text"])
def test_lora_training_changes_only_the_adapters(base_model, text_targets):
    lora = {"rank": 4, "alpha": 4, "unet_targets": ["attn", "proj"], "text_encoder_targets": text_targets}
    sys_ = digits_system(init_from=str(base_model), lora=lora)
    assert sys_.trainable == "lora"
    adapters = {n for n, p in sys_.named_parameters() if ".lora_" in n}
    assert {n for n, p in sys_.named_parameters() if p.requires_grad} == adapters
    before = {k: v.clone() for k, v in sys_.state_dict().items()}
    fit(sys_)
    after = sys_.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= adapters  # weight decay 0.1 and lr 1e-2: frozen weights would move
    assert any(".lora_B." in k for k in changed)
    assert any(k.startswith("conditioner.") for k in changed) == bool(text_targets)
    groups = sys_.trainer.optimizers[0].param_groups
    assert [g.get("name") for g in groups] == (["unet_lora", "text_encoder"] if text_targets else [None])


def test_unet_plus_text_encoder_has_its_own_learning_rate(base_model):
    sys_ = digits_system(init_from=str(base_model), trainable="unet+text_encoder", text_encoder_lr=1e-5)
    before = {k: v.clone() for k, v in sys_.state_dict().items()}
    fit(sys_, steps=2)
    groups = sys_.trainer.optimizers[0].param_groups
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-2), ("text_encoder", 1e-5)]
    after = sys_.state_dict()
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"unet", "conditioner"}  # the autoencoder stays frozen


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lora={"rank": 4}), "needs model.init_from"),
        (dict(init_from="BASE", lora={"rank": 4, "ranks": 2}), r"unknown key\(s\) \['ranks'\]"),
        (dict(init_from="BASE", lora={"unet_targets": ["atn"]}), "'atn'"),
        (dict(init_from="BASE", lora={"rank": 4}, ema={"decay": 0.9}), "model.ema=null"),
        (dict(trainable="lora"), "needs a model.lora block"),
        (dict(trainable="unet", lora={"rank": 4}), "model.trainable=lora or model.lora=null"),
        (dict(trainable="all"), "expected one of"),
        (dict(text_encoder_lr=1e-5), "text encoder is frozen"),
        (dict(init_from="BASE", lora={"rank": 4}, text_encoder_lr=1e-5), "text encoder is frozen"),
        (dict(export_formats=["ldm", "ckpt"]), r"unknown \['ckpt'\]"),
    ],
)
def test_bad_policy_settings_name_the_key(base_model, kwargs, message):
    if kwargs.get("init_from") == "BASE":
        kwargs = dict(kwargs, init_from=str(base_model))
    with pytest.raises(ValueError, match=message):
        digits_system(**kwargs)


@pytest.mark.slow  # two `python sample.py` processes (~10 s each)
def test_sample_script_lora(lora_pipe, tiny_sd_folder, tmp_path):
    """`python sample.py lora=PATH lora_scale=S` as a shell runs it: the images of Pipeline.load_lora at S;
    a LoRA for another model stops it with the unmatched layers named."""
    import numpy as np
    from PIL import Image

    from tests.test_sample_script import run_sample

    path = save_kohya(tmp_path / "lora.safetensors", lora_file(lora_pipe), lora_pipe.unet)
    args = ["prompt=a photo of the digit two", "steps=3", "sampler=euler", "seed=4", "guidance_scale=3.0"]
    proc = run_sample(
        f"ckpt={tiny_sd_folder}", f"lora={path}", "lora_scale=0.8", *args, f"out_dir={tmp_path / 's'}"
    )
    assert proc.returncode == 0, proc.stderr
    pipe = ldm.load_pipeline(tiny_sd_folder).load_lora(path, scale=0.8)
    expected = pipe("a photo of the digit two", steps=3, sampler="euler", seed=4, guidance_scale=3.0)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s" / "00000.png")), np.asarray(expected))

    name = "lora_unet_down_blocks_9_attentions_0_proj_in"  # a fifth level: another model's layer
    other = {
        f"{name}.lora_down.weight": torch.zeros(2, 32, 1, 1),
        f"{name}.lora_up.weight": torch.zeros(32, 2, 1, 1),
    }
    save_file(other, tmp_path / "other.safetensors")
    proc = run_sample(f"ckpt={tiny_sd_folder}", f"lora={tmp_path / 'other.safetensors'}", *args,
                      f"out_dir={tmp_path / 'o'}")  # fmt: skip
    assert proc.returncode != 0 and name in proc.stderr
