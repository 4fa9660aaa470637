"""The original single-file checkpoint (CompVis / Stability `.ckpt` or `.safetensors`): split and join.

Layout (CompVis/stable-diffusion `configs/stable-diffusion/v1-inference.yaml` and Stability-AI/stablediffusion
`configs/stable-diffusion/v2-inference.yaml`: the LatentDiffusion module's attribute names; diffusers
`loaders/single_file_utils.py` reads the same keys): one flat state dict with
  model.diffusion_model.*          UNet                    first_stage_model.*   autoencoder
  cond_stage_model.transformer.*   SD1 text encoder (transformers CLIPTextModel names; `FrozenCLIPEmbedder`)
  cond_stage_model.model.*         SD2 text encoder (open_clip names; `FrozenOpenCLIPEmbedder`)
  cond_stage_model.embedding.*     class-conditional LDMs (CompVis `ClassEmbedder`, cin256 configs)
  model_ema.<flat>                 EMA of the UNet, from CompVis `LitEma`: the parameter name relative to
                                   the LatentDiffusion's `model` with dots removed
                                   (`model_ema.diffusion_modelinput_blocks00weight`), plus the buffers
                                   `model_ema.decay` and `model_ema.num_updates`
  betas, alphas_cumprod, ...       the schedule buffers (kept under "other")
Released SD1 files are EMA-only: their `model.diffusion_model.*` already are the EMA weights. "Full"
files hold both, and the EMA copy is what one samples with, the other what one fine-tunes.
Standalone autoencoder files (`vae-ft-mse-840000-ema-pruned.ckpt`) hold bare `encoder.*`/`decoder.*` keys.

Components use our layout: UNet and autoencoder keys without prefix, the text encoder as a transformers
CLIPTextModel with classic `text_model.*` keys whichever format the file used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoints._rename import StateDict
from ldm.checkpoints.io import read_state_dict, write_state_dict
from ldm.checkpoints.text_map import (
    infer_clip_text_config,
    normalize_clip_keys,
    open_clip_to_transformers,
    transformers_to_open_clip,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
CLASS_PREFIX = "cond_stage_model."  # + "embedding.weight" (CompVis ClassEmbedder)
_CLASS_KEYS = (CLASS_PREFIX + "embedding.",)
EMA_UNET_PREFIX = "model_ema.diffusion_model"  # followed by the UNet key with its dots removed
EMA_DECAY, EMA_NUM_UPDATES = "model_ema.decay", "model_ema.num_updates"
_BARE_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
TEXT_FORMATS = ("clip", "open_clip")


def ema_key(unet_key: str) -> str:
    """The `LitEma` buffer name of a UNet parameter.

    `input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`.
    """
    return EMA_UNET_PREFIX + unet_key.replace(".", "")


def _unflatten_ema(flat: Mapping[str, torch.Tensor], unet_keys: list[str]) -> StateDict:
    """Give dot-less EMA names their real UNet keys back by matching against the UNet keys without dots."""
    lookup = {k.replace(".", ""): k for k in unet_keys}
    if len(lookup) != len(unet_keys):
        raise ValueError("two UNet keys coincide once dots are removed; EMA names cannot be resolved")
    out: StateDict = {}
    missing = []
    for name, value in flat.items():
        real = lookup.get(name)
        if real is None:
            missing.append(EMA_UNET_PREFIX + name)
        else:
            out[real] = value
    if missing:
        raise ValueError(
            f"{len(missing)} EMA weight(s) match no model.diffusion_model.* key, e.g. {missing[:3]}"
        )
    return out


def split_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, StateDict], str | None]:
    """Full single-file state dict -> ({"unet", "vae", "text_encoder", "class_embedder", "unet_ema", "other"},
    text format). "class_embedder" holds a class-label embedding's keys without `cond_stage_model.`.

    The text format is "clip" (SD1), "open_clip" (SD2) or None when the file has no text encoder; every
    key lands in exactly one component, so `join_state_dict` restores the file.
    """
    names = ("unet", "vae", "class_embedder", "unet_ema", "other")
    parts: dict[str, StateDict] = {name: {} for name in names}
    clip: StateDict = {}
    open_clip: StateDict = {}
    flat_ema: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX) :]] = value
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX) :]] = value
        elif key.startswith(CLIP_PREFIX):
            clip[key[len(CLIP_PREFIX) :]] = value
        elif key.startswith(OPEN_CLIP_PREFIX):
            open_clip[key[len(OPEN_CLIP_PREFIX) :]] = value
        elif key.startswith(_CLASS_KEYS):
            parts["class_embedder"][key[len(CLASS_PREFIX) :]] = value
        elif key.startswith(EMA_UNET_PREFIX):
            flat_ema[key[len(EMA_UNET_PREFIX) :]] = value
        else:
            parts["other"][key] = value
    if clip and open_clip:
        raise ValueError(
            "checkpoint holds both cond_stage_model.transformer.* and cond_stage_model.model.* keys"
        )
    text_format = "clip" if clip else "open_clip" if open_clip else None
    # Old SD1 files lack `text_model.`; position_ids buffers are dropped (see text_map).
    parts["text_encoder"] = normalize_clip_keys(clip) if clip else open_clip_to_transformers(open_clip)
    if flat_ema:
        parts["unet_ema"] = _unflatten_ema(flat_ema, list(parts["unet"]))
    if not parts["unet"] and not parts["vae"] and not parts["text_encoder"]:
        # A standalone autoencoder file: bare CompVis keys (its `loss.*` keys stay under "other").
        other = parts["other"]
        parts["vae"] = {k: v for k, v in other.items() if k.startswith(_BARE_VAE_PREFIXES)}
        parts["other"] = {k: v for k, v in other.items() if not k.startswith(_BARE_VAE_PREFIXES)}
    return parts, text_format


def join_state_dict(
    components: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    text_encoder_format: str = "clip",
    ema_decay: float = 0.9999,
    ema_num_updates: int = 0,
) -> StateDict:
    """Components (our layout) -> one single-file state dict; "unet_ema" is written as `model_ema.*`.

    `text_encoder_format`: "clip" writes `cond_stage_model.transformer.text_model.*` (SD1), "open_clip"
    converts to `cond_stage_model.model.*` (SD2). An EMA without `model_ema.decay`/`num_updates` in
    "other" gets them from `ema_decay`/`ema_num_updates`, since CompVis code loads them with the EMA.
    """
    if text_encoder_format not in TEXT_FORMATS:
        raise ValueError(f"text_encoder_format must be one of {TEXT_FORMATS}, got {text_encoder_format!r}")
    unknown = set(components) - {"unet", "vae", "text_encoder", "class_embedder", "unet_ema", "other"}
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}")
    out: StateDict = {}
    out.update({UNET_PREFIX + k: v for k, v in components.get("unet", {}).items()})
    out.update({VAE_PREFIX + k: v for k, v in components.get("vae", {}).items()})
    text = components.get("text_encoder") or {}
    if text and text_encoder_format == "clip":
        out.update({CLIP_PREFIX + k: v for k, v in normalize_clip_keys(text).items()})
    elif text:
        out.update({OPEN_CLIP_PREFIX + k: v for k, v in transformers_to_open_clip(text).items()})
    out.update({CLASS_PREFIX + k: v for k, v in (components.get("class_embedder") or {}).items()})
    ema = components.get("unet_ema") or {}
    out.update({ema_key(k): v for k, v in ema.items()})
    other = dict(components.get("other", {}))
    if ema:
        other.setdefault(EMA_DECAY, torch.tensor(ema_decay, dtype=torch.float32))
        other.setdefault(EMA_NUM_UPDATES, torch.tensor(ema_num_updates, dtype=torch.int32))
    clash = set(other) & set(out)
    if clash:
        raise ValueError(f"'other' keys collide with component keys: {sorted(clash)[:5]}")
    out.update(other)
    return out


@dataclass
class SingleFileCheckpoint:
    """What `load_single_file` returns: components in our layout plus what the file said about itself."""

    components: dict[str, StateDict]
    text_encoder_format: str | None
    has_ema: bool = False  # the file had separate model_ema.* weights
    global_step: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def text_layer(self) -> str:
        """Which text-encoder layer conditions the UNet: SD2 (open_clip) takes the penultimate one."""
        return "penultimate" if self.text_encoder_format == "open_clip" else "last"

    def text_encoder_config(self, head_width: int = 64) -> dict[str, Any] | None:
        """A CLIPTextConfig dict read off the text encoder's shapes (quick_gelu for OpenAI CLIP, gelu for
        OpenCLIP; see `infer_clip_text_config`), or None without a text encoder."""
        text = self.components.get("text_encoder")
        if not text:
            return None
        act = "gelu" if self.text_encoder_format == "open_clip" else "quick_gelu"
        return infer_clip_text_config(text, hidden_act=act, head_width=head_width)


def load_single_file(
    path: str | os.PathLike,
    *,
    use_ema: bool = True,
    allow_pickle: bool = False,
    opt_in: str = "allow_pickle=True",
) -> SingleFileCheckpoint:
    """Read an original single-file checkpoint (.safetensors / .ckpt) into components.

    use_ema=True (sampling): when the file holds separate EMA weights, they become "unet" and the
    trained weights are dropped. use_ema=False (fine-tuning): "unet" holds the trained weights and
    "unet_ema" the EMA, to resume from. EMA-only files give the same "unet" either way. See
    `read_state_dict` for `allow_pickle` / `opt_in`.
    """
    state_dict, info = read_state_dict(path, allow_pickle=allow_pickle, opt_in=opt_in)
    parts, text_format = split_state_dict(state_dict)
    if not parts["unet"] and not parts["vae"]:
        prefixes = sorted({k.split(".", 1)[0] for k in state_dict})[:10]
        raise ValueError(
            f"{path} is not a Stable Diffusion checkpoint: no model.diffusion_model.* or first_stage_model.* "
            f"keys (top-level names: {prefixes})"
        )
    has_ema = bool(parts["unet_ema"])
    if has_ema and use_ema:
        parts["unet"] = parts.pop("unet_ema")
    elif not has_ema:
        parts.pop("unet_ema")
    metadata = dict(info.get("metadata", {}))
    step = info.get("global_step", metadata.get("global_step"))
    return SingleFileCheckpoint(
        components=parts,
        text_encoder_format=text_format,
        has_ema=has_ema,
        global_step=int(step) if step is not None else None,
        metadata=metadata,
    )


def save_single_file(
    path: str | os.PathLike,
    components: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    text_encoder_format: str = "clip",
    global_step: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write components as an original single file (`.safetensors` or `.ckpt`), atomically.

    Include "unet_ema" to write a full (trained + EMA) file; to write an EMA-only file as released,
    pass the EMA weights as "unet".
    """
    state_dict = join_state_dict(components, text_encoder_format=text_encoder_format)
    return write_state_dict(path, state_dict, metadata=metadata, global_step=global_step)
