"""Autoencoder files: write a trained `AutoencoderKL` as one safetensors file, and read an autoencoder back
from that file or from the layouts autoencoders are released in.

Our file holds bare `encoder.*` / `decoder.*` / `quant_conv.*` / `post_quant_conv.*` keys, as the released
standalone VAEs do (e.g. `vae-ft-mse-840000-ema-pruned`), and the constructor arguments, scale factor
included, as JSON under the safetensors metadata key "ldm.vae". Reading also takes an original SD single
file (`first_stage_model.*`, CompVis `ldm/models/diffusion/ddpm.py` `LatentDiffusion`) and diffusers
folders (`AutoencoderKL` config.json + weights, or a pipeline folder's `vae/`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

from ldm.checkpoints.build import build_vae, infer_vae_kwargs
from ldm.checkpoints.configs import vae_config_from_diffusers
from ldm.checkpoints.diffusers_folder import DIFFUSERS_WEIGHTS, read_folder_weights
from ldm.checkpoints.io import read_state_dict, write_state_dict
from ldm.checkpoints.single_file import split_state_dict
from ldm.checkpoints.vae_map import vae_from_diffusers
from ldm.nn.autoencoder import AutoencoderKL

VAE_METADATA_KEY = "ldm.vae"  # safetensors metadata: the AutoencoderKL kwargs (with scale_factor) as JSON
AUTOENCODER_FILE_NAME = "autoencoder.safetensors"  # what an export into a folder is called


def save_autoencoder(
    autoencoder: AutoencoderKL,
    path: str | os.PathLike,
    ema_shadow: dict[str, Tensor] | None = None,
    global_step: int | None = None,
) -> Path:
    """Write `autoencoder` as `load_autoencoder` reads it: bare `encoder.*`/`decoder.*` keys (as released
    standalone VAEs) with the constructor kwargs, scale_factor included, as JSON in metadata "ldm.vae";
    `ema_shadow` (parameter name -> averaged tensor) replaces the weights it covers."""
    state = autoencoder.state_dict()
    if ema_shadow is not None:
        state.update({k: v.to(state[k].dtype) for k, v in ema_shadow.items()})
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in autoencoder.config.items()}
    meta = {VAE_METADATA_KEY: json.dumps(config), "ldm.ema": str(ema_shadow is not None).lower()}
    return write_state_dict(
        Path(path), {k: v.cpu() for k, v in state.items()}, metadata=meta, global_step=global_step
    )


def _vae_from_diffusers_dir(folder: Path, allow_pickle: bool) -> AutoencoderKL:
    """A diffusers `AutoencoderKL` folder (config.json + diffusion_pytorch_model.*)."""
    config = json.loads((folder / "config.json").read_text())
    weights = read_folder_weights(folder, (DIFFUSERS_WEIGHTS,), allow_pickle=allow_pickle)
    return build_vae(vae_from_diffusers(weights), vae_config_from_diffusers(config))


def load_autoencoder(path: str | os.PathLike, *, allow_pickle: bool = False) -> AutoencoderKL:
    """An AutoencoderKL (eval mode) with its scale factor from: our `save_autoencoder` file; an original SD
    single file (`first_stage_model.*`) or standalone VAE file (bare `encoder.*`, e.g. vae-ft-mse-840000);
    a diffusers pipeline folder (its `vae/`) or a diffusers VAE folder. Files without our metadata get
    their architecture from the weights and SD's 0.18215; diffusers folders their config's
    `scaling_factor`."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise ValueError(f"{path}: not a diffusers pipeline folder with vae/ nor a diffusers VAE folder")
        return _vae_from_diffusers_dir(folder, allow_pickle)
    state_dict, info = read_state_dict(path, allow_pickle=allow_pickle)
    meta = info.get("metadata", {})
    vae = split_state_dict(state_dict)[0]["vae"]
    if not vae:
        raise ValueError(f"{path} holds no autoencoder weights (first_stage_model.* or encoder.*/decoder.*)")
    if VAE_METADATA_KEY in meta:
        kwargs = json.loads(meta[VAE_METADATA_KEY])
    elif "ldm" in meta and "vae" in json.loads(meta["ldm"]):  # a single file saved by our Pipeline
        kwargs = json.loads(meta["ldm"])["vae"]
    else:
        kwargs = infer_vae_kwargs(vae)
    return build_vae(vae, kwargs)
