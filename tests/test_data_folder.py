"""FolderDataModule: both folder layouts, the batch contract, broken files, repeats, instance prompts and
validation splits (ldm/data/folder.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.folder import FolderDataModule, scan_folder

# Non-square on purpose: (height, width) = (16, 24) with resolution 16 is a center crop without resizing,
# so pixels can be compared exactly and original_size / crop_coords are informative.
H, W = 16, 24


def make_folder(
    root: Path, layout: str, n: int = 6, size: tuple[int, int] = (H, W), fmt: str = "png"
) -> dict:
    """Write `n` random RGB images under `root` in `layout` ("txt", "jsonl" or "csv"); returns
    key -> (array, caption). Half the images sit in a subfolder, to check keys keep their folder."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out, rows = {}, []
    for i in range(n):
        rel = f"sub/img{i:02d}.{fmt}" if i % 2 else f"img{i:02d}.{fmt}"
        arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        (root / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(root / rel, quality=95)
        caption = f"a photo number {i}, with ünïcode"
        if layout == "txt":
            (root / rel).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        rows.append({"file_name": rel, "text": caption})
        out[rel.rsplit(".", 1)[0]] = (arr, caption)
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif layout == "csv":
        with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    return out


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) tensor in [-1, 1] back to an (H, W, 3) uint8 array."""
    return ((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def epoch(dm: FolderDataModule, split: str = "train") -> list[dict]:
    """All batches of one pass of a loader."""
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return list(loader)


@pytest.mark.parametrize("layout", ["txt", "jsonl", "csv"])
def test_layouts_give_back_images_and_captions(tmp_path, layout):
    src = make_folder(tmp_path / "src", layout)
    dm = FolderDataModule(tmp_path / "src", resolution=H, batch_size=4, num_workers=0, random_flip=False)
    batches = epoch(dm)
    assert sum(len(b["key"]) for b in batches) == 4  # 6 images, drop_last
    dm.drop_last = False
    batches = epoch(dm)
    seen = set()
    for b in batches:
        n = len(b["key"])
        assert b["image"].shape == (n, 3, H, H) and b["image"].dtype == torch.float32
        assert b["image"].min() >= -1 and b["image"].max() <= 1
        assert b["original_size"].dtype == torch.long and b["original_size"].tolist() == [[H, W]] * n
        assert b["crop_coords"].dtype == torch.long and b["crop_coords"].tolist() == [[0, (W - H) // 2]] * n
        assert "label" not in b
        for key, image, caption in zip(b["key"], b["image"], b["caption"]):
            arr, want_caption = src[key]
            left = (W - H) // 2
            np.testing.assert_array_equal(to_uint8(image), arr[:, left : left + H])
            assert caption == want_caption
            seen.add(key)
    assert seen == set(src) and "sub/img01" in seen


def test_caption_lists_in_jsonl_are_drawn_from(tmp_path):
    root = tmp_path / "src"
    make_folder(root, "jsonl", n=1)
    row = {"file_name": "img00.png", "text": ["first caption", "second caption"]}
    (root / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    dm = FolderDataModule(root, resolution=H, batch_size=1, num_workers=0, repeats=40, drop_last=False)
    captions = {c for b in epoch(dm) for c in b["caption"]}
    assert captions == {"first caption", "second caption"}


def test_broken_and_missing_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "src"
    src = make_folder(root, "jsonl", n=4)
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    good = (root / "img00.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])  # the header parses, the pixels do not
    extra = ["empty.png", "text.png", "truncated.png", "missing.png"]
    with open(root / "metadata.jsonl", "a") as f:
        f.writelines(json.dumps({"file_name": name, "text": "broken"}) + "\n" for name in extra)

    # The scan finds the missing file and the two unreadable headers.
    dm = FolderDataModule(root, resolution=H, batch_size=5, num_workers=2, random_flip=False, drop_last=False)
    dm.setup("fit")
    assert len(dm.train_dataset) == 5  # 4 good + the truncated one, found only when decoded
    assert dm.skip_counts == {"missing_image": 1, "decode_error": 2}
    # Decoding in the workers finds the truncated file; its count reaches the main process, and the next
    # image takes its place so the batch keeps its size.
    batches = list(dm.train_dataloader())
    assert dm.skip_counts == {"missing_image": 1, "decode_error": 3}
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 5 and set(keys) == set(src)
    assert sum(b["skipped"].get("decode_error", 0) for b in batches) == 1
    assert all(c != "broken" for b in batches for c in b["caption"])


def test_folder_of_only_broken_images_raises(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no readable images"):
        FolderDataModule(tmp_path, resolution=8, num_workers=0).setup("fit")


def test_repeats_and_instance_prompt(tmp_path):
    src = make_folder(tmp_path / "src", "txt", n=3)
    dm = FolderDataModule(
        tmp_path / "src", resolution=H, batch_size=3, num_workers=0, repeats=4, instance_prompt="a sks dog"
    )
    batches = epoch(dm)
    keys = [k for b in batches for k in b["key"]]
    assert len(dm.train_dataset) == 12 and sorted(keys) == sorted(list(src) * 4)
    assert {c for b in batches for c in b["caption"]} == {"a sks dog"}


def test_txt_layout_without_caption_files_is_unconditional(tmp_path):
    make_folder(tmp_path, "txt", n=2)
    for txt in tmp_path.rglob("*.txt"):
        txt.unlink()
    assert [item.caption for item in scan_folder(tmp_path)] == ["", ""]


def test_val_fraction_and_val_root(tmp_path):
    src = make_folder(tmp_path / "src", "txt", n=10)
    dm = FolderDataModule(tmp_path / "src", resolution=H, batch_size=2, num_workers=0, val_fraction=0.3)
    dm.setup("fit")
    train = {i.key for i in dm.train_dataset.items}
    val = {i.key for i in dm.val_dataset.items}
    assert len(val) == 3 and not train & val and train | val == set(src)
    again = FolderDataModule(tmp_path / "src", resolution=H, num_workers=0, val_fraction=0.3)
    again.setup("fit")
    assert {i.key for i in again.val_dataset.items} == val  # the same split in every process and run
    assert sum(len(b["key"]) for b in again.val_dataloader()) == 3

    other = make_folder(tmp_path / "val", "csv", n=2)
    dm = FolderDataModule(tmp_path / "src", resolution=H, num_workers=0, val_root=tmp_path / "val")
    assert {k for b in epoch(dm, "val") for k in b["key"]} == set(other)
    no_val = FolderDataModule(tmp_path / "src", resolution=H, num_workers=0)
    assert no_val.val_dataloader() == []
    with pytest.raises(ValueError):
        FolderDataModule(tmp_path / "src", val_fraction=0.1, val_root=tmp_path / "val")


def test_config_instantiates(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    make_folder(tmp_path / "src", "txt", n=2)
    data = OmegaConf.load(Path(__file__).parents[1] / "configs" / "data" / "folder.yaml")
    cfg = OmegaConf.create({"seed": 0, "data": data})  # composed as train.yaml composes it
    dm = instantiate(cfg.data, root=str(tmp_path / "src"), resolution=H, num_workers=0)
    assert isinstance(dm, FolderDataModule) and (dm.batch_size, dm.num_workers) == (4, 0)
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, H, H)
