"""Image decoding and the training transform: any PIL mode to RGB, resize, crop (with SDXL crop
coordinates), flip, and scaling to [-1, 1].

Written on PIL and numpy only (torchvision is not a dependency). The geometry follows the SDXL paper
(Podell et al. 2023, Sec. 2.2, "micro-conditioning"): the image is resized so that it covers the target,
then cropped; `crop_coords` is the crop's (top, left) in the resized image, and after a horizontal flip
the left coordinate is measured in the flipped image (as kohya-ss/sd-scripts does), so the pair always
describes the pixels the model sees.
"""

from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what img2dataset writes, in order of preference
# EXIF orientations 5-8 rotate by 90 degrees, so the displayed width is the stored height.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """Bytes that are not an image PIL can read to the end (truncated, corrupt, or another format)."""


class UnsupportedModeError(ValueError):
    """An image mode with no sensible RGB conversion."""


def open_image(data: bytes) -> Image.Image:
    """Open image bytes lazily: PIL parses the header (size, mode, EXIF) and decodes pixels only on
    `load()`, so size filters can run first. PIL's `DecompressionBombError` (over twice
    `Image.MAX_IMAGE_PIXELS`) passes through for the caller to count as "too_large"."""
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x MAX_IMAGE_PIXELS PIL only warns; our own max_pixels check decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise
    except Exception as exn:  # UnidentifiedImageError, struct errors from corrupt headers, ...
        raise ImageDecodeError(f"cannot open image: {exn}") from exn


def _orientation(img: Image.Image) -> int:
    """EXIF orientation tag (1 = upright) read from the header, 1 when absent or unreadable."""
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # broken EXIF blocks are common in scraped JPEGs and say nothing about the pixels
        return 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is displayed, i.e. after its EXIF rotation, without decoding it."""
    w, h = img.size
    return (h, w) if _orientation(img) in _TRANSPOSED_ORIENTATIONS else (w, h)


def load_rgb(img: Image.Image, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an opened image to upright RGB.

    `min_size` (width, height, displayed orientation) lets JPEG decoding use DCT scaling (`draft`) to
    1/2, 1/4 or 1/8 of the stored size while staying at least that large; LAION images are often far
    larger than the training resolution and this is most of the decoding time.
    """
    if min_size is not None:
        w, h = min_size
        if _orientation(img) in _TRANSPOSED_ORIENTATIONS:
            w, h = h, w
        img.draft(None, (int(w), int(h)))  # a no-op for formats other than JPEG
    try:
        img.load()  # ImageFile.LOAD_TRUNCATED_IMAGES stays False, so truncated data raises here
    except Exception as exn:
        raise ImageDecodeError(f"cannot decode image: {exn}") from exn
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed orientation tag: keep the pixels as stored
        pass
    return to_rgb(img)


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Flatten transparency onto white, the background most viewers show (black would darken edges)."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    """A single-channel array already scaled to [0, 255] as an RGB image."""
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited on white, 16/32-bit and float grayscale are
    rescaled rather than clipped (PIL's own `convert("L")` clips I;16 to 255, turning most pixels white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    if mode.startswith("I;16"):
        return _array_to_rgb(np.asarray(img).astype(np.float64) / 257.0)  # 65535 -> 255
    if mode == "I":
        arr = np.asarray(img).astype(np.float64)
        # 16-bit PNGs and TIFFs arrive as "I" in some Pillow versions; 8-bit data fits in [0, 255].
        return _array_to_rgb(arr / 257.0 if arr.max(initial=0) > 255 else arr)
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        # Float images are [0, 1] by convention; larger values are taken to be on the 8-bit scale.
        return _array_to_rgb(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr)
    try:
        # 1, L, P, CMYK (PIL undoes Adobe's inverted CMYK JPEGs on load), YCbCr, HSV
        return img.convert("RGB")
    except Exception as exn:  # e.g. LAB, which needs a colour-management profile
        raise UnsupportedModeError(f"cannot convert mode {mode!r} to RGB: {exn}") from exn


def cover_size(width: int, height: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(width, height) of the smallest aspect-preserving resize that covers target_h x target_w."""
    scale = max(target_w / width, target_h / height)
    return max(target_w, round(width * scale)), max(target_h, round(height * scale))


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1] (the autoencoder's input range)."""
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


@dataclass
class ImageTransform:
    """Resize to cover the target, crop (center or random), optionally flip, scale to [-1, 1].

    The target is resolution x resolution, or a bucket's (h, w) when aspect-ratio bucketing picks one.
    Returns the tensor and the crop's (top, left) in the resized (and, if flipped, mirrored) image.
    """

    resolution: int = 256
    random_crop: bool = False
    random_flip: bool = True

    def __call__(
        self, img: Image.Image, rng: random.Random, size: tuple[int, int] | None = None
    ) -> tuple[Tensor, tuple[int, int]]:
        """Transform one RGB image; `rng` is the worker's generator (crop offset and flip)."""
        th, tw = size or (self.resolution, self.resolution)
        rw, rh = cover_size(img.width, img.height, th, tw)
        if (rw, rh) != img.size:
            # Lanczos when shrinking (PIL resamples with an antialiasing support); bicubic when enlarging,
            # where Lanczos' ringing shows.
            shrinking = rw < img.width
            resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
            img = img.resize((rw, rh), resample=resample)
        if self.random_crop:
            top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
        else:
            top, left = int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))
        img = img.crop((left, top, left + tw, top + th))
        if self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = rw - tw - left  # the same pixels, measured from the left edge of the mirrored image
        return to_tensor(img), (top, left)
