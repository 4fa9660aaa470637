"""DreamBooth data (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation"): a handful of instance images captioned with a prompt holding a rare token
("a photo of sks dog"), and, for the prior-preservation loss, class images captioned with the class
prompt ("a photo of a dog") that the model itself generated before fine-tuning. `class_prompt` may also
be a list (class images drawn round-robin, each captioned with its own prompt, as kohya-ss/sd-scripts
reads a class folder with captions): the prior of several prompts preserved at once.

As diffusers' `examples/dreambooth/train_dreambooth.py` builds it: an epoch has max(#instance, #class)
examples; example i pairs instance image i mod #instance with class image i mod #class, and a batch of
`batch_size` examples holds the `batch_size` instance samples first, then their `batch_size` class
samples (2 x batch_size in all), marked by `batch["is_prior"]`. `LatentDiffusionSystem` then minimizes
instance loss + `prior_loss_weight` x class loss (`ldm.diffusion.loss.prior_preservation_loss`).

Missing class images (fewer than `num_class_images` in `class_root`) are generated once in
`prepare_data` with our `Pipeline`: the model being fine-tuned, as loaded by `model.init_from`, or the
pipeline at `class_generator`; they are PNG files in `class_root`, so the next run finds them there.
With `cache_latents` both sets are read from the latent cache (ldm.data.latent_cache).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ldm.data.folder import FolderDataModule, ImageFolderDataset, collate_folder
from ldm.data.transforms import IMAGE_EXTENSIONS, ImageTransform

log = logging.getLogger(__name__)


def image_files(folder: str | Path) -> list[Path]:
    """Image files directly in `folder` (sorted), none when it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )


@torch.no_grad()
def generate_class_images(
    pipe: Any, folder: str | Path, prompt: str | Sequence[str], num_images: int, resolution: int,
    steps: int = 30, guidance_scale: float = 7.5, sampler: str = "dpmpp_2m", seed: int = 0,
) -> int:  # fmt: skip
    """Fill `folder` up to `num_images` images drawn by `pipe`; returns how many were made.

    Image k is `class_{k:05d}.png` with its caption in `class_{k:05d}.txt`: the prompt (or, given a list,
    prompt k mod len), drawn with seed `seed + k`, written atomically, so an interrupted run leaves whole
    images and the next run draws only the missing ones (diffusers' train_dreambooth.py also tops the class
    folder up to `num_class_images`)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    have = len(image_files(folder))
    todo = [k for k in range(num_images) if not (folder / f"class_{k:05d}.png").exists()]
    todo = todo[: max(0, num_images - have)]
    for done, k in enumerate(todo, 1):  # one call per image: image k depends on its seed alone
        text = prompts[k % len(prompts)]
        image = pipe(text, steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed + k,
                     height=resolution, width=resolution, output="pil")[0]  # fmt: skip
        tmp = folder / f".class_{k:05d}.{os.getpid()}.tmp"
        image.save(tmp, format="PNG")
        (folder / f"class_{k:05d}.txt").write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, folder / f"class_{k:05d}.png")
        if done % 10 == 0 or done == len(todo):
            log.info("class images: %d/%d generated in %s", done, len(todo), folder)
    return len(todo)


class DreamBoothDataset(Dataset):
    """Pairs of (instance sample, class sample), as diffusers' `DreamBoothDataset`; without a class set,
    instance samples alone. Indices may be `(index, epoch)` pairs (`EpochSampler`), passed on."""

    def __init__(self, instance: Dataset, klass: Dataset | None = None) -> None:
        self.instance, self.klass = instance, klass

    def __len__(self) -> int:
        """max(#instance, #class) examples per epoch."""
        return max(len(self.instance), len(self.klass)) if self.klass is not None else len(self.instance)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """{"instance": sample, "class": sample or None} for example `index`."""
        i, epoch = index if isinstance(index, tuple) else (index, None)

        def at(ds: Dataset) -> Any:
            j = i % len(ds)
            return (j, epoch) if epoch is not None else j

        return {
            "instance": self.instance[at(self.instance)],
            "class": self.klass[at(self.klass)] if self.klass is not None else None,
        }

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Instance samples, then class samples, in one batch of the data contract (images or cached
        latents), with `is_prior` (bool, one per sample) marking the class samples."""
        samples = [e["instance"] for e in examples]
        samples += [e["class"] for e in examples if e["class"] is not None]
        base = getattr(self.instance, "collate", collate_folder)
        batch = base(samples)
        batch["is_prior"] = torch.arange(len(samples)) >= len(examples)
        return batch


class DreamBoothDataModule(FolderDataModule):
    """DreamBooth batches (configs/data/dreambooth.yaml): `instance_root` captioned `instance_prompt`, and
    with a `class_prompt`, class images from `class_root` (generated when missing) for prior preservation.
    Every FolderDataModule option applies to both sets (resolution, crops, flips, repeats of the instance
    images, latent cache); there is no validation set."""

    def __init__(
        self,
        instance_root: str | Path,
        instance_prompt: str,
        class_root: str | Path | None = None,
        class_prompt: str | Sequence[str] | None = None,
        num_class_images: int = 100,
        class_generator: str | None = None,
        class_steps: int = 30,
        class_guidance_scale: float = 7.5,
        class_sampler: str = "dpmpp_2m",
        **folder: Any,
    ) -> None:
        if not instance_prompt:
            raise ValueError("data.instance_prompt: DreamBooth needs the prompt with the rare token")
        if (class_prompt is None) != (class_root is None):
            raise ValueError(
                "data.class_prompt and data.class_root go together: both for prior preservation, neither "
                f"without (got class_prompt={class_prompt!r}, class_root={class_root!r})"
            )
        if class_prompt is not None and num_class_images < 1:
            raise ValueError(f"data.num_class_images={num_class_images}: must be >= 1 with a class_prompt")
        super().__init__(root=instance_root, instance_prompt=instance_prompt, **folder)
        if class_prompt is not None and not isinstance(class_prompt, str):
            class_prompt = [str(p) for p in class_prompt]  # Hydra's ListConfig -> list
        self.class_root = Path(class_root) if class_root is not None else None
        self.class_prompt, self.num_class_images = class_prompt, num_class_images
        self.class_generator = class_generator
        self.class_steps, self.class_guidance_scale = class_steps, class_guidance_scale
        self.class_sampler = class_sampler

    @property
    def prior_preservation(self) -> bool:
        """Whether batches carry class samples."""
        return self.class_prompt is not None

    def class_pipeline(self) -> Any:
        """The pipeline that draws class images: `class_generator`, else the model about to be trained."""
        if self.class_generator is not None:
            from ldm.pipeline_io import load_pipeline

            return load_pipeline(self.class_generator)
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is None or not hasattr(model, "to_pipeline"):
            raise ValueError(
                f"{self.class_root} holds fewer than data.num_class_images={self.num_class_images} images: "
                "set data.class_generator to a pipeline to draw them, or train a LatentDiffusionSystem"
            )
        return model.to_pipeline(use_ema=False)

    def prepare_data(self) -> None:
        """Generate missing class images (once, on the first rank of each node)."""
        if not self.prior_preservation or len(image_files(self.class_root)) >= self.num_class_images:
            return
        pipe = self.class_pipeline()
        home = next(pipe.unet.parameters()).device  # the model's own modules: put them back after
        if torch.cuda.is_available():
            pipe.to("cuda")
        try:
            n = generate_class_images(
                pipe, self.class_root, self.class_prompt, self.num_class_images, self.resolution,
                steps=self.class_steps, guidance_scale=self.class_guidance_scale, sampler=self.class_sampler,
                seed=self.seed,
            )  # fmt: skip
        finally:
            pipe.to(home)
        log.info("generated %d class images of %r in %s", n, self.class_prompt, self.class_root)

    def setup(self, stage: str | None = None) -> None:
        """The instance set (FolderDataModule), then the first `num_class_images` class images."""
        if isinstance(self.train_dataset, DreamBoothDataset):
            return
        super().setup(stage)
        klass = None
        if self.prior_preservation:
            items = self._scan(self.class_root)[: self.num_class_images]
            if len(items) < self.num_class_images:
                raise ValueError(
                    f"data.class_root={self.class_root} has {len(items)} readable images, "
                    f"data.num_class_images={self.num_class_images}: run prepare_data (train.py does)"
                )
            tf = ImageTransform(self.resolution, self.random_crop, self.random_flip)
            # One class prompt captions every class image; with several, each image keeps the caption it
            # was drawn with (its .txt). Its own seed: instance and class samples draw independent flips.
            prompt = self.class_prompt if isinstance(self.class_prompt, str) else None
            klass = ImageFolderDataset(items, tf, 1, prompt, seed=self.seed + 1)
            if self.cache_latents:
                klass = self.cached(klass)
        self.train_dataset = DreamBoothDataset(self.train_dataset, klass)
