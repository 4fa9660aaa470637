"""Which parameters a latent diffusion run trains (`model.trainable`, `model.lora`, `model.text_encoder_lr`).

- "unet": the whole UNet (SD's own training; diffusers `train_text_to_image.py`);
- "unet+text_encoder": UNet and CLIP text encoder, the latter at its own learning rate (DreamBooth with
  text-encoder training, Ruiz et al. 2022; diffusers `train_dreambooth.py --train_text_encoder`);
- "lora": LoRA adapters only (Hu et al. 2021) on the UNet layers of `lora.unet_targets` and, optionally,
  the text encoder layers of `lora.text_encoder_targets` (kohya-ss/sd-scripts `train_network.py`).
Everything else is frozen (requires_grad False, no optimizer state, so no weight decay touches it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ldm.adapters.lora import (
    TEXT_TARGETS,
    UNET_TARGETS,
    LoraWeight,
    add_lora,
    lora_layers,
    lora_parameters,
    target_names,
)

TRAINABLE = ("unet", "unet+text_encoder", "lora")


@dataclass(frozen=True)
class LoraSettings:
    """`model.lora`: rank r, alpha (null: = rank, scale 1), dropout on the adapter input, target groups
    (ldm.adapters.lora.UNET_TARGETS / TEXT_TARGETS, or module-name suffixes)."""

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    unet_targets: tuple[str, ...] = ("attn",)
    text_encoder_targets: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LoraSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"model.lora: unknown key(s) {unknown}; known: {sorted(known)}")
        values = dict(config)
        for key in ("unet_targets", "text_encoder_targets"):
            if key in values:
                values[key] = tuple(values[key] or ())
        settings = cls(**values)
        if int(settings.rank) < 1:
            raise ValueError(f"model.lora.rank={settings.rank}: must be >= 1")
        return settings

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def resolve_trainable(trainable: str | None, lora: Mapping[str, Any] | None) -> str:
    """The policy name: `trainable` when given (checked), else "lora" with a lora block, else "unet"."""
    mode = trainable or ("lora" if lora else "unet")
    if mode not in TRAINABLE:
        raise ValueError(f"model.trainable={trainable!r}: expected one of {list(TRAINABLE)}")
    if mode == "lora" and not lora:
        raise ValueError("model.trainable=lora needs a model.lora block (e.g. model/lora=attn_r8)")
    if mode != "lora" and lora:
        raise ValueError(
            f"model.lora is set but model.trainable={mode}: set model.trainable=lora or model.lora=null"
        )
    return mode


def apply_trainable(
    mode: str, unet: nn.Module, text_model: nn.Module | None, lora: LoraSettings | None
) -> None:
    """Freeze what `mode` does not train; for "lora", add the adapters (B = 0: the model is unchanged)."""
    if mode == "lora":
        assert lora is not None
        unet.requires_grad_(False)
        add_lora(
            unet,
            target_names(unet, lora.unet_targets, UNET_TARGETS),
            lora.rank,
            lora.lora_alpha,
            lora.dropout,
        )
        if lora.text_encoder_targets:
            if text_model is None:
                raise ValueError("model.lora.text_encoder_targets: this model has no CLIP text encoder")
            text_model.requires_grad_(False)
            names = target_names(text_model, lora.text_encoder_targets, TEXT_TARGETS)
            add_lora(text_model, names, lora.rank, lora.lora_alpha, lora.dropout)
    elif mode == "unet+text_encoder":
        if text_model is None:
            raise ValueError("model.trainable=unet+text_encoder: this model has no CLIP text encoder")
        text_model.requires_grad_(True)


def param_groups(
    mode: str, unet: nn.Module, text_model: nn.Module | None, text_encoder_lr: float | None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the UNet's trainable parameters at the optimizer's learning rate, the
    text encoder's (full or LoRA) at `text_encoder_lr` when given."""
    if mode == "lora":
        groups = [{"params": lora_parameters(unet), "name": "unet_lora"}]
        text = lora_parameters(text_model) if text_model is not None else []
    else:
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "name": "unet"}]
        text = [p for p in text_model.parameters() if p.requires_grad] if mode == "unet+text_encoder" else []
    if text:
        group: dict[str, Any] = {"params": text, "name": "text_encoder"}
        if text_encoder_lr is not None:
            group["lr"] = float(text_encoder_lr)
        groups.append(group)
    if len(groups) == 1:  # one group: Lightning's LR monitor keeps its plain key (lr-AdamW)
        del groups[0]["name"]
    return groups


def is_adapter_key(key: str) -> bool:
    """A state-dict key of a LoRA adapter parameter (peft: `<layer>.lora_A.<adapter>.weight`)."""
    return ".lora_A." in key or ".lora_B." in key


def adapter_weights(state: Mapping[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, LoraWeight]:
    """LoRA weights of a module saved under `prefix` (e.g. "unet.") in a run checkpoint, by layer name."""
    out = {}
    for key, down in state.items():
        if key.startswith(prefix) and ".lora_A." in key:
            layer = key[len(prefix) :].split(".lora_A.")[0]
            up = state[key.replace(".lora_A.", ".lora_B.")]
            out[layer] = LoraWeight(down.float(), up.float(), alpha)
    return out


@torch.no_grad()
def frozen_checksum(*modules: nn.Module | None) -> float:
    """Sum (float64) of every frozen parameter: a LoRA checkpoint does not hold the base, so a resume
    checks that `init_from` still gives the same base weights."""
    total = torch.zeros((), dtype=torch.float64)
    for module in modules:
        if module is None:
            continue
        adapters = {id(p) for p in lora_parameters(module)}
        for p in module.parameters():
            if id(p) not in adapters and not p.requires_grad:
                total += p.detach().double().sum().cpu()
    return float(total)


def count(module: nn.Module | None) -> tuple[int, int]:
    """(trainable, total) parameters of `module`."""
    if module is None:
        return 0, 0
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


__all__ = [
    "TRAINABLE", "LoraSettings", "adapter_weights", "apply_trainable", "count", "frozen_checksum",
    "is_adapter_key", "lora_layers", "param_groups", "resolve_trainable",
]  # fmt: skip
