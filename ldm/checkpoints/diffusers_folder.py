"""The diffusers folder layout (`StableDiffusionPipeline.save_pretrained`): read into our layout, and write.

  model_index.json                    pipeline class and, per component, [library, class name]
  unet/config.json + diffusion_pytorch_model.safetensors   (or .bin, or sharded with an *.index.json)
  vae/config.json  + diffusion_pytorch_model.safetensors
  text_encoder/config.json + model.safetensors              (transformers CLIPTextModel)
  tokenizer/                          (transformers CLIPTokenizer files)
  scheduler/scheduler_config.json
diffusers stores SD2's text encoder with its last layer removed (23 of 24), since its pipeline conditions
on `last_hidden_state`; our SD2 conditioner takes the penultimate layer of the full model instead. Both
are the same computation, so `save_diffusers_folder(text_layer="penultimate")` drops the last layer, and
a loaded folder always means "last layer" (`DiffusersFolder.text_layer`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoints._rename import StateDict
from ldm.checkpoints.configs import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)
from ldm.checkpoints.io import read_state_dict, write_state_dict
from ldm.checkpoints.text_map import drop_last_text_layers, normalize_clip_keys
from ldm.checkpoints.unet_map import unet_from_diffusers, unet_to_diffusers
from ldm.checkpoints.vae_map import vae_from_diffusers, vae_to_diffusers

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")  # .safetensors / .bin names used by transformers
# transformers 4.x refuses safetensors files whose metadata lacks a known "format".
_PT = {"format": "pt"}


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, with the path in the error when it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    return json.loads(path.read_text())


def _weight_candidates(stems: tuple[str, ...], variant: str | None) -> list[str]:
    """File names to try, safetensors first, for the given stems (`variant`: e.g. "fp16")."""
    names = []
    for ext in ("safetensors", "bin"):
        for stem in stems:
            base = f"{stem}.{variant}" if variant else stem
            names += [f"{base}.{ext}", f"{base}.{ext}.index.json"]
    return names


def read_folder_weights(
    folder: Path, stems: tuple[str, ...], *, variant: str | None = None, allow_pickle: bool = False
) -> StateDict:
    """Weights of one component folder: single file or shards listed in an `*.index.json` weight map."""
    for name in _weight_candidates(stems, variant):
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return read_state_dict(path, allow_pickle=allow_pickle)[0]
        state_dict: StateDict = {}
        for shard in sorted(set(_read_json(path)["weight_map"].values())):
            state_dict.update(read_state_dict(folder / shard, allow_pickle=allow_pickle)[0])
        return state_dict
    raise FileNotFoundError(
        f"no weights in {folder} (looked for {', '.join(_weight_candidates(stems, variant))})"
    )


@dataclass
class DiffusersFolder:
    """A diffusers folder in our terms: weights in original key layout, our constructor kwargs."""

    unet: StateDict
    unet_kwargs: dict[str, Any]
    vae: StateDict | None
    vae_kwargs: dict[str, Any] | None
    text_encoder: StateDict | None  # CLIPTextModel, classic `text_model.*` keys
    text_encoder_config: dict[str, Any] | None  # a CLIPTextConfig dict
    tokenizer_path: Path | None
    scheduler_config: dict[str, Any] | None
    model_index: dict[str, Any]
    sample_size: int | None = None  # the UNet's latent side length
    text_layer: str = "last"  # diffusers pipelines condition on the text encoder's last layer


def load_diffusers_folder(
    path: str | os.PathLike, *, variant: str | None = None, allow_pickle: bool = False
) -> DiffusersFolder:
    """Read a diffusers Stable Diffusion folder; components other than the UNet may be absent."""
    root = Path(path)
    model_index = _read_json(root / "model_index.json")
    unet_config = _read_json(root / "unet" / "config.json")

    def weights(name: str, stems: tuple[str, ...]) -> StateDict:
        """One component's weights (diffusers or transformers file names)."""
        return read_folder_weights(root / name, stems, variant=variant, allow_pickle=allow_pickle)

    unet = unet_from_diffusers(weights("unet", (DIFFUSERS_WEIGHTS,)))
    vae = vae_kwargs = text = text_config = None
    if (root / "vae" / "config.json").is_file():
        vae_kwargs = vae_config_from_diffusers(_read_json(root / "vae" / "config.json"))
        vae = vae_from_diffusers(weights("vae", (DIFFUSERS_WEIGHTS,)))
    if (root / "text_encoder" / "config.json").is_file():
        text_config = _read_json(root / "text_encoder" / "config.json")
        text = normalize_clip_keys(weights("text_encoder", TRANSFORMERS_WEIGHTS))
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    tokenizer = root / "tokenizer"
    return DiffusersFolder(
        unet=unet,
        unet_kwargs=unet_config_from_diffusers(unet_config),
        vae=vae,
        vae_kwargs=vae_kwargs,
        text_encoder=text,
        text_encoder_config=text_config,
        tokenizer_path=tokenizer if tokenizer.is_dir() else None,
        scheduler_config=_read_json(scheduler_file) if scheduler_file.is_file() else None,
        model_index=model_index,
        sample_size=unet_config.get("sample_size"),
    )


def _diffusers_version() -> str:
    """The installed diffusers version for `_diffusers_version` (read from package metadata, no import)."""
    try:
        return importlib_metadata.version("diffusers")
    except importlib_metadata.PackageNotFoundError:
        return "0.30.0"


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Pretty JSON as diffusers and transformers write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """A tokenizer object (`save_pretrained`) or a folder of tokenizer files (copied)."""
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    else:
        shutil.copytree(Path(tokenizer), folder)


def save_diffusers_folder(
    path: str | os.PathLike,
    *,
    unet: Mapping[str, torch.Tensor],
    unet_kwargs: Mapping[str, Any],
    vae: Mapping[str, torch.Tensor],
    vae_kwargs: Mapping[str, Any],
    text_encoder: Mapping[str, torch.Tensor],
    text_encoder_config: Mapping[str, Any] | Any,
    tokenizer: Any,
    scheduler_config: Mapping[str, Any],
    scheduler_class: str = "PNDMScheduler",
    sample_size: int | None = None,
    text_layer: str = "last",
    overwrite: bool = False,
) -> Path:
    """Write a folder that `StableDiffusionPipeline.from_pretrained` loads, from components in our layout.

    `text_encoder_config`: a CLIPTextConfig or its dict. `tokenizer`: a transformers tokenizer or a folder.
    `scheduler_config`: the scheduler's fields (betas, prediction_type, ...); `_class_name` defaults to
    `scheduler_class`. `sample_size`: latent side (default: autoencoder resolution / its downsampling).
    `text_layer`: "penultimate" drops the text encoder's last layer (see the module docstring). The folder
    is built next to `path` and moved into place at the end, so a failure leaves no partial folder.
    """
    root = Path(path)
    if root.exists() and not overwrite:
        raise FileExistsError(f"{root} exists; pass overwrite=True to replace it")
    if text_layer not in ("last", "penultimate"):
        raise ValueError(f"text_layer must be 'last' or 'penultimate', got {text_layer!r}")
    te_config = dict(
        text_encoder_config.to_dict() if hasattr(text_encoder_config, "to_dict") else text_encoder_config
    )
    text = normalize_clip_keys(text_encoder)
    if text_layer == "penultimate":
        text, te_config = drop_last_text_layers(text, te_config, 1)
    te_config.setdefault("architectures", ["CLIPTextModel"])
    te_config.setdefault("model_type", "clip_text_model")
    vae_config = vae_config_to_diffusers(vae_kwargs)
    if sample_size is None:
        sample_size = vae_config["sample_size"] // 2 ** (len(vae_config["block_out_channels"]) - 1)
    version = _diffusers_version()
    unet_config = {
        **unet_config_to_diffusers(unet_kwargs, sample_size=sample_size),
        "_diffusers_version": version,
    }
    vae_config["_diffusers_version"] = version
    sched = {"_class_name": scheduler_class, "_diffusers_version": version, **dict(scheduler_config)}

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        _write_json(tmp / "unet" / "config.json", unet_config)
        write_state_dict(
            tmp / "unet" / f"{DIFFUSERS_WEIGHTS}.safetensors", unet_to_diffusers(unet), metadata=_PT
        )
        _write_json(tmp / "vae" / "config.json", vae_config)
        write_state_dict(
            tmp / "vae" / f"{DIFFUSERS_WEIGHTS}.safetensors", vae_to_diffusers(vae), metadata=_PT
        )
        _write_json(tmp / "text_encoder" / "config.json", te_config)
        # Text weights keep the `text_model.` prefix: every transformers version loads that layout.
        write_state_dict(tmp / "text_encoder" / "model.safetensors", text, metadata=_PT)
        _save_tokenizer(tokenizer, tmp / "tokenizer")
        _write_json(tmp / "scheduler" / "scheduler_config.json", sched)
        _write_json(
            tmp / "model_index.json",
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": version,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", scheduler_class],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "requires_safety_checker": False,
            },
        )
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
