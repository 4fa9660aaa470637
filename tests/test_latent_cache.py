"""The latent + text-embedding cache (ldm/data/latent_cache.py): training from it follows the same loss
curve as encoding every step, hits and misses, rebuilding when the autoencoder, resolution or
augmentations change, damaged entries encoded again, and random crops refused."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.folder import FolderDataModule
from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedule import NoiseSchedule
from ldm.systems.diffusion import LatentDiffusionSystem
from tests.tiny import REPO, randomize_, text_conditioner


def tiny(group: str, seed: int):
    return randomize_(instantiate(OmegaConf.load(REPO / f"configs/model/{group}/tiny.yaml")), seed=seed)


def digit_folder(root: Path, n: int = 8) -> Path:
    """n digits at 40 x 32 px (resized and center-cropped to 32) captioned with lists of two captions."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        grey = Image.fromarray(np.uint8(digits.images[i] * 15), "L").resize((32, 40), Image.BICUBIC)
        grey.convert("RGB").save(root / f"d{i}.png")
        rows.append(
            {"file_name": f"d{i}.png", "text": [f"digit {digits.target[i]}", f"a {digits.target[i]}"]}
        )
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def system(sample_posterior: bool) -> LatentDiffusionSystem:
    torch.manual_seed(0)
    return LatentDiffusionSystem(
        tiny("unet", 1), tiny("autoencoder", 2), text_conditioner(), NoiseSchedule(), DiffusionLoss,
        partial(torch.optim.AdamW, lr=1e-3), ucg_rate=0.3, sample_posterior=sample_posterior,
        log_buckets_every_n_steps=0,
    )  # fmt: skip


class Losses(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def train(root: Path, cache: bool, sample_posterior: bool, steps: int = 6) -> list[float]:
    dm = FolderDataModule(root, resolution=32, batch_size=4, num_workers=0, random_flip=True,
                          cache_latents=cache, cache_dir=root.parent / "cache")  # fmt: skip
    losses = Losses()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[losses], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(system(sample_posterior), datamodule=dm)
    if cache:
        assert dm.cache_stats["miss"] == 8 and dm.cache_stats["text_miss"] == 17  # 16 captions + ""
    return losses.losses


@pytest.mark.parametrize("sample_posterior", [False, True])
def test_training_from_the_cache_follows_the_same_loss_curve(tmp_path, sample_posterior):
    """Same flips, caption picks, caption dropout and (with sample_posterior) posterior draws: the curves
    agree to float rounding (encoding one image or a batch of them differs in the last bits)."""
    root = digit_folder(tmp_path / "digits")
    on_the_fly = train(root, cache=False, sample_posterior=sample_posterior)
    cached = train(root, cache=True, sample_posterior=sample_posterior)
    assert len(on_the_fly) == 6 and len(set(on_the_fly)) == 6
    np.testing.assert_allclose(cached, on_the_fly, rtol=1e-6, atol=1e-6)


def datamodule(root: Path, autoencoder, conditioner, **kwargs) -> FolderDataModule:
    kwargs = {"resolution": 32, "batch_size": 4, "num_workers": 0, "random_flip": False} | kwargs
    dm = FolderDataModule(root, cache_latents=True, **kwargs)
    dm.encoders = (autoencoder, conditioner)
    dm.setup("fit")
    return dm


def test_hits_misses_and_what_invalidates(tmp_path):
    root = digit_folder(tmp_path / "digits", n=4)
    ae, cond = tiny("autoencoder", 2), text_conditioner()
    first = datamodule(root, ae, cond)
    assert first.cache_stats["miss"] == 4 and first.cache_stats["hit"] == 0
    assert (root / ".latent_cache").is_dir()  # next to the data by default
    again = datamodule(root, ae, cond)
    assert again.cache_stats["hit"] == 4 and again.cache_stats["miss"] == 0
    assert again.cache_stats["text_hit"] == 9
    batch = next(iter(again.train_dataloader()))
    # the cached mean is the autoencoder's posterior mean of the transformed image
    from ldm.data.folder import ImageFolderDataset
    from ldm.data.transforms import ImageTransform

    items = again.train_dataset.items
    images = ImageFolderDataset(items, ImageTransform(32, False, False))
    ref = ae.encode(torch.stack([images[i]["image"] for i in range(4)])).mean
    got = torch.stack([again.train_dataset[i]["latent_mean"] for i in range(4)])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert set(batch) >= {"latent_mean", "latent_std", "context", "uncond_context", "caption"}

    changed_ae = tiny("autoencoder", 3)
    assert datamodule(root, changed_ae, cond).cache_stats["miss"] == 4
    scaled = tiny("autoencoder", 2)
    scaled.scale_factor = 0.5
    assert datamodule(root, scaled, cond).cache_stats["miss"] == 4
    assert datamodule(root, ae, cond, resolution=16).cache_stats["miss"] == 4
    flips = datamodule(root, ae, cond, random_flip=True)
    assert flips.cache_stats["miss"] == 4 and flips.train_dataset.entries[items[0].key]["mean"].shape[0] == 2
    assert datamodule(root, ae, cond).cache_stats["hit"] == 4  # the first key's folder is still there
    assert len(list((root / ".latent_cache").iterdir())) == 5
    # an edited image is encoded again, the others are hits
    Image.new("RGB", (32, 32), "white").save(root / "d0.png")
    edited = datamodule(root, ae, cond)
    assert (edited.cache_stats["hit"], edited.cache_stats["miss"]) == (3, 1)


def test_damaged_entries_are_encoded_again(tmp_path):
    root = digit_folder(tmp_path / "digits", n=3)
    ae, cond = tiny("autoencoder", 2), text_conditioner()
    first = datamodule(root, ae, cond, cache_dir=tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    entries = sorted((folder / "images").glob("*.safetensors"))
    good = entries[0].read_bytes()
    entries[0].write_bytes(good[: len(good) // 2])  # truncated
    (sorted((folder / "texts").glob("*.safetensors"))[0]).write_bytes(b"not a safetensors file")
    again = datamodule(root, ae, cond, cache_dir=tmp_path / "cache")
    assert again.cache_stats["corrupt"] == 2
    assert (again.cache_stats["hit"], again.cache_stats["miss"], again.cache_stats["text_miss"]) == (2, 1, 1)
    assert entries[0].stat().st_size == len(good)  # rewritten (the same tensors, checked below)
    for key, entry in first.train_dataset.entries.items():
        torch.testing.assert_close(again.train_dataset.entries[key]["mean"], entry["mean"])


def test_random_crops_cannot_be_cached(tmp_path):
    root = digit_folder(tmp_path / "digits", n=2)
    with pytest.raises(ValueError, match="random_crop"):
        datamodule(root, tiny("autoencoder", 2), text_conditioner(), random_crop=True)


def test_the_cache_needs_the_encoders(tmp_path):
    root = digit_folder(tmp_path / "digits", n=2)
    dm = FolderDataModule(root, resolution=32, batch_size=2, num_workers=0, cache_latents=True)
    with pytest.raises(ValueError, match="cache_latents"):
        dm.setup("fit")
