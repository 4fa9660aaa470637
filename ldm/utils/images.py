"""Writing sampled images: PNGs with their settings in the text chunk, and contact grids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The settings in the "parameters" text that A1111 / ComfyUI show for a PNG (prompt, then a line of
    "Key: value" pairs), so the images carry their recipe in the form those tools read."""
    # A class-conditional model's images have a class label instead of a prompt.
    label = meta.get("class_name") or meta.get("label")
    lines = [meta["prompt"] if meta.get("prompt") is not None else f"class {label}"]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    lines.append(
        f"Steps: {meta['steps']}, Sampler: {meta['sampler']}, CFG scale: {meta['guidance_scale']}, "
        f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}"
    )
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, meta: dict[str, Any]) -> None:
    """Save `image` as PNG with `meta` as JSON ("ldm") and as A1111-style "parameters" text chunks."""
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(meta))
    info.add_text("ldm", json.dumps(meta))
    image.save(path, pnginfo=info)


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images row by row into one image (square-ish by default)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid
