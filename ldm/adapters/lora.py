"""LoRA adapters on our UNet and CLIP text encoder through `peft` (no file formats here: ldm/checkpoints/
lora_files.py reads and writes them).

Low-Rank Adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen
weight W gets a trainable update (alpha / r) * B @ A with A: r x in (random) and B: out x r (zero), so
training starts from the base model exactly. `peft.inject_adapter_in_model` wraps the chosen `nn.Linear` /
`nn.Conv2d` layers (what diffusers' `load_lora_weights` does on its own models); a wrapped layer keeps
its base weight as `<name>.base_layer.weight` and the adapter as `<name>.lora_A.<adapter>.weight` /
`lora_B`. Merging adds the update into W (`merge`), unmerging subtracts it again, and `remove_lora`
puts the plain layers back (merged or not), so exported weights keep the original SD key names.

Target groups name the layers the way LoRA trainers do (kohya-ss/sd-scripts `networks/lora.py` targets
the transformer blocks' attention and feed-forward layers, optionally the convolutions of the ResBlocks;
diffusers' `train_dreambooth_lora.py` targets to_q/to_k/to_v/to_out.0), in our (original SD) module names.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER = "default"

# Module-name suffixes per group, in the original SD names (ldm/nn/attention.py, ldm/nn/unet.py).
UNET_TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
    "self_attn": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"),
    "cross_attn": ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
    "ff": ("ff.net.0.proj", "ff.net.2"),
    "proj": ("proj_in", "proj_out"),  # SpatialTransformer in/out (1x1 convs in SD1, linear in SD2)
    "resnet": ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection"),  # kohya "LoCon" convs
}  # fmt: skip
# transformers CLIPTextModel (kohya TEXT_ENCODER_TARGET_REPLACE_MODULE = CLIPAttention, CLIPMLP).
TEXT_TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
}


@dataclass(frozen=True)
class LoraWeight:
    """One adapted layer: `down` (A, r x in [x k x k]), `up` (B, out x r [x 1 x 1]) and `alpha`: the
    layer computes W x + (alpha / r) B A x (kohya's lora_down / lora_up / .alpha, peft's lora_A / lora_B)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def target_names(module: nn.Module, targets: Sequence[str], table: Mapping[str, Sequence[str]]) -> list[str]:
    """Full names of the Linear / Conv2d layers of `module` that the groups in `targets` select.

    An entry of `targets` is a group of `table` ("attn", "ff", ...) or a module-name suffix
    ("attn2.to_k"); one that selects nothing is an error naming it (a typo must not train nothing)."""
    names = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    chosen: list[str] = []
    for target in targets:
        suffixes = table.get(target, (target,))
        found = [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]
        if not found:
            raise ValueError(
                f"LoRA target {target!r} selects no Linear/Conv2d layer; groups: {sorted(table)} "
                "or a module-name suffix such as 'attn2.to_k'"
            )
        chosen += [n for n in found if n not in chosen]
    return chosen


def _exact(name: str) -> str:
    """A peft rank/alpha pattern that matches exactly this module name (peft treats keys as regexes)."""
    return re.escape(name)


def add_lora(
    module: nn.Module,
    names: Sequence[str],
    rank: int | Mapping[str, int],
    alpha: float | Mapping[str, float],
    dropout: float = 0.0,
) -> list[str]:
    """Wrap the layers `names` of `module` with LoRA adapters (B = 0: the output is unchanged) and freeze
    everything else in `module`. `rank` / `alpha` per layer when mappings. Returns `names`."""
    if not names:
        raise ValueError("no layers to adapt")
    if has_lora(module):
        raise ValueError("this module already holds LoRA layers: remove_lora() (or fuse) them first")
    ranks = rank if isinstance(rank, Mapping) else dict.fromkeys(names, rank)
    alphas = alpha if isinstance(alpha, Mapping) else dict.fromkeys(names, alpha)
    for name in names:
        if int(ranks[name]) < 1:
            raise ValueError(f"LoRA rank of {name} must be >= 1, got {ranks[name]}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(
        r=int(ranks[names[0]]),
        lora_alpha=float(alphas[names[0]]),
        lora_dropout=float(dropout),
        target_modules=list(names),
        rank_pattern={_exact(n): int(ranks[n]) for n in names},
        alpha_pattern={_exact(n): float(alphas[n]) for n in names},
        init_lora_weights=True,  # A: Kaiming-uniform, B: zeros (Hu et al. 2021, Sec. 4.1)
    )
    # peft treats a module with a transformers-style `config` as a transformers model and looks up weight
    # conversions that our CLIP holder does not have: inject into a plain stand-in holding the same
    # children, then put the (possibly replaced) children back.
    proxy = nn.Module()
    for child_name, child in module.named_children():
        proxy.add_module(child_name, child)
    inject_adapter_in_model(config, proxy, adapter_name=ADAPTER)
    for child_name, child in proxy.named_children():
        setattr(module, child_name, child)
    for name, param in module.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return list(names)


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA-wrapped layers of `module`, by module name (the base layer's name)."""
    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def has_lora(module: nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, LoraLayer) for m in module.modules())


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (lora_A / lora_B) of `module`."""
    return [p for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def set_lora_scale(module: nn.Module, scale: float) -> None:
    """Multiply every adapter's update by `scale` (A1111's `<lora:name:0.8>`, diffusers' `lora_scale`):
    scaling = scale * alpha / r. Merged layers are unmerged first (the merged delta used the old scale)."""
    for layer in lora_layers(module).values():
        merged = layer.merged
        if merged:
            layer.unmerge()
        layer.set_scale(ADAPTER, scale)
        if merged:
            layer.merge()


def merge_lora(module: nn.Module) -> None:
    """Add each adapter's update into its base weight (the forward no longer pays for the adapter)."""
    for layer in lora_layers(module).values():
        if not layer.merged:
            layer.merge()


def unmerge_lora(module: nn.Module) -> None:
    """Subtract the merged updates again (the adapters stay trainable / rescalable)."""
    for layer in lora_layers(module).values():
        if layer.merged:
            layer.unmerge()


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def remove_lora(module: nn.Module, merge: bool) -> nn.Module:
    """Put the plain layers back, with the adapters' updates added in (`merge`) or dropped; the state
    dict has the original key names again. In place; returns `module`."""
    for name, layer in lora_layers(module).items():
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        _set_submodule(module, name, layer.get_base_layer())
    return module


def merged_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` with every adapter merged in and removed (a plain module); `module` is kept."""
    return remove_lora(copy.deepcopy(module), merge=True) if has_lora(module) else module


def lora_weights(module: nn.Module) -> dict[str, LoraWeight]:
    """The adapters of `module` as (down, up, alpha) per module name: what LoRA files store."""
    out = {}
    for name, layer in lora_layers(module).items():
        down = layer.lora_A[ADAPTER].weight.detach()
        up = layer.lora_B[ADAPTER].weight.detach()
        out[name] = LoraWeight(down.clone(), up.clone(), float(layer.lora_alpha[ADAPTER]))
    return out


def load_lora(module: nn.Module, weights: Mapping[str, LoraWeight], scale: float = 1.0) -> None:
    """Add adapters holding `weights` (module name -> LoraWeight) to `module`, at `scale`, unmerged.

    Every name must be a Linear / Conv2d of `module` and every shape must fit it: otherwise a ValueError
    names the keys (a LoRA made for another model must not load half-way or silently do nothing)."""
    layers = dict(module.named_modules())
    missing = sorted(n for n in weights if not isinstance(layers.get(n), (nn.Linear, nn.Conv2d)))
    if missing:
        raise ValueError(f"LoRA layers not in the model: {_shown(missing)}")
    names = list(weights)
    add_lora(
        module,
        names,
        rank={n: weights[n].rank for n in names},
        alpha={n: weights[n].alpha for n in names},
    )
    wrapped = lora_layers(module)
    bad = []
    with torch.no_grad():
        for name, w in weights.items():
            a, b = wrapped[name].lora_A[ADAPTER].weight, wrapped[name].lora_B[ADAPTER].weight
            if a.shape != w.down.shape or b.shape != w.up.shape:
                bad.append(f"{name} (file {tuple(w.down.shape)}/{tuple(w.up.shape)}, model {tuple(a.shape)}/"
                           f"{tuple(b.shape)})")  # fmt: skip
                continue
            a.copy_(w.down)
            b.copy_(w.up)
    if bad:
        remove_lora(module, merge=False)
        raise ValueError(f"LoRA shapes do not fit the model: {_shown(bad)}")
    set_lora_scale(module, scale)
    module.requires_grad_(False)


def _shown(items: Iterable[str], n: int = 8) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")
