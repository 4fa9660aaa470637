"""Build our networks from state dicts: architecture read off the weights, then loaded into empty modules.

A community single file carries no config, so the UNet and autoencoder arguments are read from the
tensor shapes (as diffusers' `create_unet_diffusers_config_from_ldm` reads them from the original yaml).
One thing shapes cannot tell is the head layout: SD2 (linear projections, 1024-wide context) uses 64-wide
heads, SD1 eight heads; files we write store the exact arguments in their metadata, so this guess only
applies to files written elsewhere. Modules are created without allocating weights (accelerate's
`init_empty_weights`) and the loaded tensors are assigned, so a full-size model loads without a wasted
random initialization.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.unet import UNetModel

StateDict = dict[str, torch.Tensor]


def _levels(keys: list[str], pattern: str) -> dict[int, set[int]]:
    """Group indices found by `pattern` (two integer groups) into {first: {second, ...}}."""
    out: dict[int, set[int]] = {}
    for k in keys:
        m = re.match(pattern, k)
        if m:
            out.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return out


def infer_unet_kwargs(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """UNetModel arguments read off an original-layout UNet state dict (CompVis `openaimodel` names)."""
    keys = list(sd)
    conv_in = sd["input_blocks.0.0.weight"]
    model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
    # Downsamplers sit at input_blocks.{n}.0.op: they delimit the levels.
    down_at = sorted(
        int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k))
    )
    n_levels = len(down_at) + 1
    num_res_blocks = (
        (down_at[0] - 1)
        if down_at
        else sum(1 for k in keys if re.match(r"input_blocks\.\d+\.0\.in_layers\.2\.weight$", k))
    )
    channel_mult, attention_resolutions, depths = [], [], []
    for level in range(n_levels):
        first = 1 + level * (num_res_blocks + 1)
        out_ch = sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]
        channel_mult.append(out_ch // model_channels)
        blocks = _levels(keys, rf"input_blocks\.({first})\.1\.transformer_blocks\.(\d+)\.")
        if blocks:
            attention_resolutions.append(2**level)
            depths.append(len(blocks[first]))
        else:
            depths.append(1)
    mid_depth = len(_levels(keys, r"middle_block\.(1)\.transformer_blocks\.(\d+)\.").get(1, {0}))
    attn = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    context_dim = sd[attn].shape[1] if attn else None
    proj_in = next((k for k in keys if k.endswith(".proj_in.weight")), None)
    linear = proj_in is not None and sd[proj_in].ndim == 2
    sd2_like = linear or context_dim == 1024
    attn_depths = [d for d, a in zip(depths, range(n_levels)) if 2**a in attention_resolutions]
    uniform = len(set(attn_depths + [mid_depth])) == 1
    kwargs: dict[str, Any] = dict(
        in_channels=int(in_channels),
        out_channels=int(sd["out.2.weight"].shape[0]),
        model_channels=int(model_channels),
        num_res_blocks=int(num_res_blocks),
        attention_resolutions=attention_resolutions,
        channel_mult=channel_mult,
        num_heads=-1 if sd2_like else 8,
        num_head_channels=64 if sd2_like else -1,
        transformer_depth=mid_depth if uniform else [*depths[:-1], mid_depth],
        context_dim=None if context_dim is None else int(context_dim),
        use_linear_in_transformer=linear,
        # SD2.1 overflows fp16 without it; in fp32 it changes nothing, so SD2-like files get it.
        upcast_attention=sd2_like,
    )
    if "label_emb.weight" in sd:
        kwargs["num_classes"] = int(sd["label_emb.weight"].shape[0])
    return kwargs


def infer_vae_kwargs(sd: Mapping[str, torch.Tensor], scale_factor: float = 0.18215) -> dict[str, Any]:
    """AutoencoderKL arguments read off an original-layout autoencoder state dict (CompVis `model.py`)."""
    keys = list(sd)
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _levels(keys, r"encoder\.down\.(\d+)\.block\.(\d+)\.")
    ch_mult = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in sorted(levels)]
    attn_levels = {int(m.group(1)) for k in keys if (m := re.match(r"encoder\.down\.(\d+)\.attn\.", k))}
    resolution = 256  # only used to place attention by resolution; keep SD's when there is none
    return dict(
        embed_dim=int(sd["post_quant_conv.weight"].shape[1]),
        z_channels=int(sd["decoder.conv_in.weight"].shape[1]),
        double_z=True,
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
        out_ch=int(sd["decoder.conv_out.weight"].shape[0]),
        ch=int(ch),
        ch_mult=ch_mult,
        num_res_blocks=len(levels[0]),
        attn_resolutions=[resolution // 2**i for i in sorted(attn_levels)],
        resolution=resolution,
        scale_factor=scale_factor,
    )


# PyTorch's CPU allocator aligns every allocation to 64 bytes (c10 `gAlignment`).
_ALIGNMENT = 64


def aligned(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The state dict with each tensor in memory aligned as a fresh allocation is (copied only when not).

    Tensors read from a safetensors file sit at the file's byte offsets, which need not be 64-byte aligned.
    CPU kernels (oneDNN / vectorized reductions) split work differently for unaligned data, so the same
    weights at another address give results that differ in the last bit, and a model loaded from one
    format would not sample bit-identically to the same model loaded from another. Assigned as they are
    (`load_state_dict(assign=True)`), the tensors would keep the file's alignment."""
    return {
        k: v.clone() if v.device.type == "cpu" and v.data_ptr() % _ALIGNMENT else v for k, v in sd.items()
    }


def load_into_empty(
    cls: type[nn.Module], kwargs: Mapping[str, Any], sd: Mapping[str, torch.Tensor]
) -> nn.Module:
    """Create `cls(**kwargs)` without allocating weights and assign the state dict's tensors (strict)."""
    with init_empty_weights():
        module = cls(**kwargs)
    missing, unexpected = module.load_state_dict(aligned(sd), strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{cls.__name__}: the weights do not fit the architecture {dict(kwargs)}; "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    # Buffers that are not in the state dict (none today) would still be on `meta`.
    for name, buf in module.named_buffers():
        if buf.is_meta:
            raise ValueError(f"{cls.__name__}: buffer {name} was not loaded")
    return module.eval()


def build_unet(sd: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any] | None = None) -> UNetModel:
    """Our UNet with the given weights; arguments inferred from the shapes when not given."""
    return load_into_empty(UNetModel, kwargs if kwargs is not None else infer_unet_kwargs(sd), sd)


def build_vae(sd: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any] | None = None) -> AutoencoderKL:
    """Our autoencoder with the given weights; arguments inferred from the shapes when not given."""
    return load_into_empty(AutoencoderKL, kwargs if kwargs is not None else infer_vae_kwargs(sd), sd)
