"""One digit's images under one new caption: DreamBooth-style instance data (Ruiz et al. 2022) on the
bundled digits, for the `digits_lora` experiment (teach the trained digits model "a photo of sks digit").

The training split of sklearn's digits (the same stratified split as `ldm.data.digits`, so held-out
digits stay unseen) is written once as PNGs to `{root}/digit{D}_{resolution}px/` and read as an image
folder (`ldm.data.folder.FolderDataModule`) with `instance_prompt` replacing every caption.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ldm.data.digits import _load, digit_image, split_digits
from ldm.data.folder import FolderDataModule


def prepare_digit_folder(root: str | Path, digit: int, resolution: int = 32) -> Path:
    """Write (once) the training images of `digit` as PNGs; returns the folder. Atomic: a folder that
    exists is complete (written to a temporary sibling, then renamed)."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"data.digit={digit}: must be 0-9")
    folder = Path(root) / f"digit{digit}_{resolution}px"
    if folder.is_dir():
        return folder
    images, labels = _load()
    train, _ = split_digits(labels, 0.1, 0)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        for i in train:
            if int(labels[i]) == int(digit):
                digit_image(images[i], resolution).save(tmp / f"{i:04d}.png")
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():  # another process did not win the race: a real error
            raise
    return folder


class DigitInstanceDataModule(FolderDataModule):
    """The training images of one digit, every caption replaced by `instance_prompt` (configs/data/
    digit_instance.yaml). Other `FolderDataModule` arguments pass through."""

    def __init__(
        self,
        root: str | Path = "data/digit_instance",
        digit: int = 3,
        resolution: int = 32,
        instance_prompt: str = "a photo of sks digit",
        random_flip: bool = False,  # a mirrored digit is not a digit
        **kwargs: Any,
    ) -> None:
        if not 0 <= int(digit) <= 9:
            raise ValueError(f"data.digit={digit}: must be 0-9")
        self.instance_root, self.digit = Path(root), int(digit)
        folder = self.instance_root / f"digit{digit}_{resolution}px"
        super().__init__(
            folder, resolution, instance_prompt=instance_prompt, random_flip=random_flip, **kwargs
        )

    def prepare_data(self) -> None:
        prepare_digit_folder(self.instance_root, self.digit, self.resolution)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        super().setup(stage)
