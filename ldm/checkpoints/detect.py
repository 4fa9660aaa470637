"""Tell checkpoint formats apart: a diffusers folder, an original single file, or one of our training runs.

A training run is Hydra's run folder holding `.hydra/config.yaml` and
`checkpoints/last.ckpt`; `ldm_run` is returned for that folder and for a `.ckpt` inside its
`checkpoints/`. A Lightning checkpoint copied elsewhere can only be recognised by its state-dict keys:
`LDM_RUN_KEY_PREFIXES` holds the prefixes of our LightningModules (LatentDiffusionSystem: "unet.",
AutoencoderSystem: "autoencoder."), which no released single file uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from ldm.checkpoints.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, check_safetensors

CheckpointFormat = Literal["diffusers", "single_file", "ldm_run"]

# Hook: state-dict key prefixes that only our training system's Lightning checkpoints have.
LDM_RUN_KEY_PREFIXES: tuple[str, ...] = ("unet.", "autoencoder.")


def is_run_folder(path: str | os.PathLike) -> bool:
    """A training run of ours: Hydra's `.hydra/config.yaml` next to a `checkpoints/` folder."""
    p = Path(path)
    return (p / ".hydra" / "config.yaml").is_file() and (p / "checkpoints").is_dir()


def is_ldm_run_state_dict(keys: Iterable[str]) -> bool:
    """Whether state-dict keys carry the prefixes of our LightningModules (see LDM_RUN_KEY_PREFIXES)."""
    return bool(LDM_RUN_KEY_PREFIXES) and any(k.startswith(LDM_RUN_KEY_PREFIXES) for k in keys)


def _peek_keys(path: Path) -> list[str]:
    """State-dict keys of a weight file without reading the tensors where the format allows it."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        check_safetensors(path)  # a truncated file: an error naming it, not safetensors' anonymous one
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    try:
        # mmap keeps a multi-GB file on disk; weights_only as everywhere (a refused file is not ours).
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return []
    inner = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    return [k for k in inner if isinstance(k, str)]


def detect_format(path: str | os.PathLike) -> CheckpointFormat:
    """ "diffusers" (folder with model_index.json), "ldm_run" (our run folder or its .ckpt), "single_file"."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}")
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return "diffusers"
        if is_run_folder(p):
            return "ldm_run"
        raise ValueError(
            f"{p} is a folder but not a checkpoint: a diffusers pipeline has model_index.json, a training "
            "run has .hydra/config.yaml and checkpoints/"
        )
    suffix = p.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ValueError(
            f"{p} is not a checkpoint file: expected {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}, "
            "a diffusers folder or a training-run folder"
        )
    if p.parent.name == "checkpoints" and is_run_folder(p.parent.parent):
        return "ldm_run"
    if LDM_RUN_KEY_PREFIXES and is_ldm_run_state_dict(_peek_keys(p)):
        return "ldm_run"
    return "single_file"
