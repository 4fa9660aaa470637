"""DreamBooth (ldm/data/dreambooth.py): class images drawn when missing and reused after, batches of
instance samples then class samples, and the loss instance + prior_loss_weight x class (diffusers'
train_dreambooth.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import ldm
from ldm.data.dreambooth import DreamBoothDataModule, generate_class_images, image_files
from ldm.data.dreambooth_digits import write_digit_instances
from ldm.diffusion.loss import DiffusionLoss, prior_preservation_loss
from ldm.diffusion.schedule import NoiseSchedule
from ldm.systems.diffusion import LatentDiffusionSystem
from tests.tiny import REPO, randomize_, text_conditioner


def test_class_images_are_generated_when_missing_and_reused(tiny_sd_folder, tmp_path):
    pipe = ldm.load_pipeline(tiny_sd_folder)
    folder = tmp_path / "class"
    assert generate_class_images(pipe, folder, "a photo of a digit", 3, 64, steps=2, seed=5) == 3
    files = image_files(folder)
    assert [p.name for p in files] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    first = np.asarray(Image.open(files[1]))
    assert first.shape == (64, 64, 3) and not list(folder.glob(".*"))  # no temporary files left
    assert (folder / "class_00001.txt").read_text() == "a photo of a digit\n"
    assert generate_class_images(pipe, folder, "a photo of a digit", 3, 64, steps=2, seed=5) == 0
    files[1].unlink()  # image k is a function of seed + k: the missing one is drawn again, the same
    assert generate_class_images(pipe, folder, "a photo of a digit", 3, 64, steps=2, seed=5) == 1
    np.testing.assert_array_equal(np.asarray(Image.open(files[1])), first)
    # through the data module's prepare_data (what train.py runs): tops the folder up to num_class_images
    dm = DreamBoothDataModule(
        tmp_path / "instance", "a photo of sks digit", class_root=folder, class_prompt="a photo of a digit",
        num_class_images=4, class_generator=str(tiny_sd_folder), class_steps=2, resolution=64,
    )  # fmt: skip
    dm.prepare_data()
    assert len(image_files(folder)) == 4
    # several class prompts: drawn round-robin, each image captioned with its own
    several = tmp_path / "several"
    generate_class_images(pipe, several, ["a one", "a two"], 3, 64, steps=1)
    assert [(several / f"class_0000{k}.txt").read_text() for k in range(3)] == [
        "a one\n",
        "a two\n",
        "a one\n",
    ]


def folders(tmp_path: Path) -> tuple[Path, Path]:
    inst = tmp_path / "inst"
    write_digit_instances(inst, digit=3, n=2)
    klass = tmp_path / "class"
    write_digit_instances(klass, digit=7, n=5)
    return inst, klass


def test_batches_are_instance_samples_then_class_samples(tmp_path):
    inst, klass = folders(tmp_path)
    dm = DreamBoothDataModule(
        inst, "a photo of sks digit", class_root=klass, class_prompt="a photo of a digit", num_class_images=5,
        resolution=32, batch_size=2, num_workers=0, random_flip=False,
    )  # fmt: skip
    dm.setup("fit")
    assert len(dm.train_dataset) == 5  # max(#instance, #class), as diffusers
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # the ragged fifth example is dropped
    class_keys = set()
    for batch in batches:
        assert batch["image"].shape == (4, 3, 32, 32)
        assert batch["is_prior"].tolist() == [False, False, True, True]
        assert batch["caption"] == ["a photo of sks digit"] * 2 + ["a photo of a digit"] * 2
        assert all(k.startswith("sks_3_") for k in batch["key"][:2])
        class_keys |= set(batch["key"][2:])
    assert len(class_keys) == 4 and all(k.startswith("sks_7_") for k in class_keys)
    # without prior preservation: instance samples alone
    plain = DreamBoothDataModule(inst, "a photo of sks digit", resolution=32, batch_size=2, num_workers=0)
    plain.setup("fit")
    (batch,) = list(plain.train_dataloader())
    assert batch["is_prior"].tolist() == [False, False] and batch["image"].shape[0] == 2
    # a list of class prompts: class images keep the captions they were drawn with (their .txt)
    for k, path in enumerate(image_files(klass)):
        path.with_suffix(".txt").write_text(f"a photo of the digit {k}")
    listed = DreamBoothDataModule(
        inst, "a photo of sks digit", class_root=klass, class_prompt=["a", "b"], num_class_images=5,
        resolution=32, batch_size=2, num_workers=0,
    )  # fmt: skip
    listed.setup("fit")
    captions = {c for b in listed.train_dataloader() for c in b["caption"][2:]}
    assert len(captions) == 4 and all(c.startswith("a photo of the digit ") for c in captions)


def test_cached_dreambooth_batches(tmp_path):
    inst, klass = folders(tmp_path)
    dm = DreamBoothDataModule(
        inst, "a photo of sks digit", class_root=klass, class_prompt="a photo of a digit", num_class_images=3,
        resolution=32, batch_size=2, num_workers=0, cache_latents=True,
    )  # fmt: skip
    ae = randomize_(instantiate(OmegaConf.load(REPO / "configs/model/autoencoder/tiny.yaml")), seed=1)
    cond = text_conditioner()
    dm.encoders = (ae, cond)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent_mean"].shape == (4, 4, 8, 8) and "image" not in batch
    assert batch["is_prior"].tolist() == [False, False, True, True]
    torch.testing.assert_close(batch["context"][0], cond(["a photo of sks digit"])[0])
    torch.testing.assert_close(batch["context"][3], cond(["a photo of a digit"])[0])
    torch.testing.assert_close(batch["uncond_context"][2], cond([""])[0])


def test_bad_settings_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="class_root"):
        DreamBoothDataModule(tmp_path, "a photo of sks dog", class_prompt="a photo of a dog")
    with pytest.raises(ValueError, match="instance_prompt"):
        DreamBoothDataModule(tmp_path, "")
    inst, klass = folders(tmp_path)
    dm = DreamBoothDataModule(inst, "sks", class_root=klass, class_prompt="a digit", num_class_images=9,
                              resolution=32, num_workers=0)  # fmt: skip
    with pytest.raises(ValueError, match="num_class_images"):
        dm.prepare_data()  # 5 images, no generator and no model to draw the others


def test_loss_is_instance_plus_weighted_prior_as_diffusers():
    """diffusers: chunk the prediction in two, mse of each half (mean over all elements), and add
    prior_loss_weight x the class half; ours takes per-sample losses and the mask."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    pred_inst, pred_prior = pred.chunk(2)
    target_inst, target_prior = target.chunk(2)
    reference = F.mse_loss(pred_inst, target_inst) + 0.7 * F.mse_loss(pred_prior, target_prior)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    is_prior = torch.tensor([False] * 3 + [True] * 3)
    total, instance, prior = prior_preservation_loss(per_sample, is_prior, 0.7)
    torch.testing.assert_close(total, reference)
    torch.testing.assert_close(instance, F.mse_loss(pred_inst, target_inst))
    total0, _, prior0 = prior_preservation_loss(per_sample[:3], is_prior[:3], 0.7)
    assert prior0 == 0 and total0 == instance


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer: logging is off
@pytest.mark.parametrize("weight", [0.0, 2.5])
def test_training_step_combines_the_losses(weight):
    unet = randomize_(instantiate(OmegaConf.load(REPO / "configs/model/unet/tiny.yaml")), seed=1)
    ae = randomize_(instantiate(OmegaConf.load(REPO / "configs/model/autoencoder/tiny.yaml")), seed=2)
    sys_ = LatentDiffusionSystem(unet, ae, text_conditioner(), NoiseSchedule(), DiffusionLoss,
                                 partial(torch.optim.AdamW, lr=1e-3), prior_loss_weight=weight)  # fmt: skip
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    sys_.loss_fn = lambda net, z0, context, generator: (per_sample, torch.zeros(4, dtype=torch.long))
    batch = {"image": torch.zeros(4, 3, 32, 32), "caption": ["a"] * 4,
             "is_prior": torch.tensor([False, False, True, True])}  # fmt: skip
    assert float(sys_.training_step(batch, 0)) == pytest.approx(2.0 + weight * 15.0)
    with pytest.raises(ValueError, match="prior_loss_weight"):
        LatentDiffusionSystem(unet, ae, text_conditioner(), NoiseSchedule(), DiffusionLoss,
                              partial(torch.optim.AdamW, lr=1e-3), prior_loss_weight=-1.0)  # fmt: skip
