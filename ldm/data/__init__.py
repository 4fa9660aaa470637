"""Data modules producing batches of the shared contract: "image" (B, 3, H, W) in [-1, 1], "caption",
"original_size" (B, 2), "crop_coords" (B, 2), "key", optional "label".

Names are imported lazily (PEP 562) so that `python -m ldm.data.shards` starts without Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "SKIP_REASONS": "ldm.data.stats",
    "skip_log_dict": "ldm.data.stats",
    "WebDataModule": "ldm.data.webdataset",
    "FolderDataModule": "ldm.data.folder",
    "DigitsDataModule": "ldm.data.digits",
    "prepare_digits": "ldm.data.digits",
    "write_shards": "ldm.data.shards",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ldm.data' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
