"""LoRA files in the two layouts other tools read: kohya and diffusers/PEFT.

- kohya (kohya-ss/sd-scripts `networks/lora.py`; what AUTOMATIC1111 and ComfyUI load):
  `lora_unet_<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (a scalar; the update is
  up @ down * alpha / rank), `lora_te_<name>...` for the text encoder. `<name>` is the module path with
  dots turned into underscores. For SD 1.x/2.x kohya trains on the diffusers UNet, so the UNet names are
  diffusers paths (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`; its
  `RE_UPDOWN` parses them), and the text encoder names are transformers' CLIPTextModel paths
  (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`). Some trainers (kohya's SDXL scripts) use the
  original SD paths instead (`lora_unet_input_blocks_1_1_...`): both are read.
- diffusers/PEFT (diffusers `StableDiffusionLoraLoaderMixin.save_lora_weights`, file
  `pytorch_lora_weights.safetensors`): `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`,
  `text_encoder.<CLIP path>.lora_A.weight`. The file carries no alpha: diffusers then uses alpha = rank
  (scale 1), so alpha / rank is folded into lora_B when writing. Files that do carry `<path>.alpha` keys
  are read with them.

Names are matched against the model's own layers; a name that fits none is an error listing the names,
never a silent no-op (diffusers `loaders/lora_conversion_utils.py` does the same conversions for its
own models).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ldm.adapters.lora import LoraWeight
from ldm.checkpoints._rename import KeyMap
from ldm.checkpoints.unet_map import layout_from_original_keys, unet_rules

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what `load_lora_weights(folder)` looks for
KOHYA_FILE = "lora.safetensors"
KOHYA_UNET, KOHYA_TE = "lora_unet_", "lora_te_"


@dataclass
class LoraFile:
    """A LoRA in our module names: UNet layers (original SD paths) and text-encoder layers (paths in the
    transformers CLIPTextModel, `text_model.encoder.layers.0.self_attn.q_proj`)."""

    unet: dict[str, LoraWeight] = field(default_factory=dict)
    text_encoder: dict[str, LoraWeight] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.unet) + len(self.text_encoder)


def plain_keys(module: nn.Module) -> list[str]:
    """State-dict keys of `module` as if it held no LoRA layers (the original SD names)."""
    keys = module.state_dict().keys()
    return [k.replace(".base_layer.", ".") for k in keys if ".lora_" not in k]


def _layers(module: nn.Module) -> list[str]:
    """Names of the Linear / Conv2d layers a LoRA can adapt (LoRA-wrapped ones by their base name)."""
    names = {k.rsplit(".", 1)[0] for k in plain_keys(module) if k.endswith(".weight")}
    plain = {
        n.replace(".base_layer", "")
        for n, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }
    return sorted(names & plain)


def _unet_to_diffusers(unet: nn.Module) -> dict[str, str]:
    """Our UNet layer name -> diffusers UNet2DConditionModel layer name."""
    keymap = KeyMap(unet_rules(layout_from_original_keys(plain_keys(unet))))
    out = {}
    for name in _layers(unet):
        new = keymap.rename(name + ".weight")
        if new is not None:
            out[name] = new.removesuffix(".weight")
    return out


def _flat(name: str) -> str:
    return name.replace(".", "_")


# ---------------------------------------------------------------------------------------------- writing
def _scalars(rank_alpha: Iterable[tuple[int, float]]) -> tuple[int, float]:
    pairs = sorted(set(rank_alpha))
    return pairs[0] if pairs else (0, 0.0)


def save_kohya(
    path: str | os.PathLike, lora: LoraFile, unet: nn.Module, metadata: Mapping[str, str] = ()
) -> Path:
    """Write `lora` in the kohya layout (diffusers-path UNet names, as sd-scripts writes for SD 1.x/2.x)."""
    to_diffusers = _unet_to_diffusers(unet)
    tensors: dict[str, torch.Tensor] = {}
    parts = [(KOHYA_UNET, lora.unet, to_diffusers), (KOHYA_TE, lora.text_encoder, None)]
    for prefix, weights, rename in parts:
        for name, w in weights.items():
            key = prefix + _flat(rename[name] if rename is not None else name)
            tensors[f"{key}.lora_down.weight"] = w.down.contiguous()
            tensors[f"{key}.lora_up.weight"] = w.up.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(w.alpha))
    rank, alpha = _scalars((w.rank, w.alpha) for w in [*lora.unet.values(), *lora.text_encoder.values()])
    meta = {  # the sd-scripts metadata keys A1111 / ComfyUI show
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        **dict(metadata),
    }  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def save_diffusers(path: str | os.PathLike, lora: LoraFile, unet: nn.Module) -> Path:
    """Write `lora` as diffusers' `pytorch_lora_weights.safetensors` (alpha / rank folded into lora_B).
    `path` is a file, or a folder that gets `pytorch_lora_weights.safetensors`."""
    to_diffusers = _unet_to_diffusers(unet)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, weights, rename in [
        ("unet.", lora.unet, to_diffusers),
        ("text_encoder.", lora.text_encoder, None),
    ]:
        for name, w in weights.items():
            key = prefix + (rename[name] if rename is not None else name)
            tensors[f"{key}.lora_A.weight"] = w.down.contiguous()
            tensors[f"{key}.lora_B.weight"] = (w.up * (w.alpha / w.rank)).contiguous()
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------- reading
def _lora_path(path: Path) -> Path:
    if path.is_dir():
        for name in (DIFFUSERS_FILE, KOHYA_FILE):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no {DIFFUSERS_FILE} or {KOHYA_FILE} in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are read as .safetensors only")
    return path


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _group(sd: Mapping[str, torch.Tensor], down: str, up: str, where: Path) -> dict[str, LoraWeight]:
    """name -> LoraWeight from `<name>{down}`, `<name>{up}` and an optional `<name>.alpha` (default: rank).
    Keys of any other kind (LoHa, DoRA magnitudes, ...) are an error naming them."""
    names = {k[: -len(down)] for k in sd if k.endswith(down)}
    other = [k for k in sd if not any(k == n + s for n in names for s in (down, up, ".alpha"))]
    if other:
        raise ValueError(
            f"{where}: keys that are not plain LoRA ({down}/{up}/.alpha): {_shown(sorted(other))}"
        )
    out = {}
    for name in sorted(names):
        if name + up not in sd:
            raise ValueError(f"{where}: {name}{down} has no {name}{up}")
        d, u = sd[name + down].float(), sd[name + up].float()
        alpha = float(sd[name + ".alpha"]) if name + ".alpha" in sd else float(d.shape[0])
        out[name] = LoraWeight(d, u, alpha)
    return out


def read_lora(path: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None) -> LoraFile:
    """A kohya or diffusers/PEFT LoRA file (or a folder holding one) in our layer names.

    `unet` / `text_encoder` (the CLIPTextModel, e.g. `conditioner.transformer`) are the models it is meant
    for: every name in the file must be one of their layers, else a ValueError lists the names that match
    nothing (a LoRA for another architecture, or a layout we do not read)."""
    path = _lora_path(Path(path))
    sd = _read(path)
    if not sd:
        raise ValueError(f"{path}: empty LoRA file")
    to_diffusers = _unet_to_diffusers(unet)
    te_layers = _layers(text_encoder) if text_encoder is not None else []
    kohya = any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in sd)
    if kohya:
        weights = _group(sd, ".lora_down.weight", ".lora_up.weight", path)
        unet_names = {KOHYA_UNET + _flat(d): ours for ours, d in to_diffusers.items()}
        unet_names.update({KOHYA_UNET + _flat(ours): ours for ours in to_diffusers})  # original-path names
        te_names = {KOHYA_TE + _flat(n): n for n in te_layers}
    else:
        sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
        weights = _group(sd, ".lora_A.weight", ".lora_B.weight", path)
        unet_names = {"unet." + d: ours for ours, d in to_diffusers.items()}
        te_names = {"text_encoder." + n: n for n in te_layers}
    out, unmatched = LoraFile(), []
    for name, w in weights.items():
        if name in unet_names:
            out.unet[unet_names[name]] = w
        elif name in te_names:
            out.text_encoder[te_names[name]] = w
        else:
            unmatched.append(name)
    if unmatched:
        hint = "" if text_encoder is not None else " (this model has no text encoder)"
        raise ValueError(
            f"{path}: {len(unmatched)} of {len(weights)} LoRA layers match no layer of this model{hint}: "
            f"{_shown(unmatched)}"
        )
    return out


def read_lora_info(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of a LoRA file (kohya's `ss_*` keys, ours)."""
    with safe_open(str(_lora_path(Path(path))), framework="pt") as f:
        return dict(f.metadata() or {})


def write_lora_info(folder: str | os.PathLike, info: Mapping[str, object]) -> Path:
    """`lora.json` next to the files: what base model and settings the adapters were trained with."""
    path = Path(folder) / "lora.json"
    path.write_text(json.dumps(dict(info), indent=2, default=str) + "\n")
    return path


def export_lora(
    folder: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None, info: Mapping[str, object]
) -> Path:
    """A LoRA run's export: `lora.safetensors` (kohya layout: A1111, ComfyUI, `Pipeline.load_lora`),
    `pytorch_lora_weights.safetensors` (diffusers `load_lora_weights(folder)`) and `lora.json` (`info`:
    base model, rank, alpha, targets). Adapter weights only. Returns the folder."""
    from ldm.adapters.lora import lora_weights

    folder = Path(folder)
    lora = LoraFile(lora_weights(unet), lora_weights(text_encoder) if text_encoder is not None else {})
    if not len(lora):
        raise ValueError("no LoRA layers to export")
    meta = {"ss_base_model": str(info.get("base", "")), "ldm_lora": json.dumps(dict(info), default=str)}
    save_kohya(folder / KOHYA_FILE, lora, unet, meta)
    save_diffusers(folder / DIFFUSERS_FILE, lora, unet)
    write_lora_info(folder, dict(info, layers=len(lora)))
    return folder


def _shown(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")
