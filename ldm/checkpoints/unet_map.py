"""UNet state dict: original CompVis/Stability `openaimodel.UNetModel` <-> diffusers `UNet2DConditionModel`.

The block correspondence (diffusers `loaders/single_file_utils.py` `convert_ldm_unet_checkpoint` and
`scripts/convert_diffusers_to_original_stable_diffusion.py` `unet_conversion_map`):
with `n` res blocks per level and `L` levels,
  input_blocks.{1 + l(n+1) + j}.{0,1}  <-> down_blocks.l.{resnets,attentions}.j
  input_blocks.{(l+1)(n+1)}.0.op       <-> down_blocks.l.downsamplers.0.conv
  middle_block.{0,1,2}                 <-> mid_block.{resnets.0, attentions.0, resnets.1}
  output_blocks.{i(n+1) + j}.{0,1}     <-> up_blocks.i.{resnets,attentions}.j        (i = L-1-l)
  output_blocks.{i(n+1) + n}.{1|2}.conv <-> up_blocks.i.upsamplers.0.conv  (slot 2 if the level has attention)
The SpatialTransformer's own keys (norm, proj_in, transformer_blocks.K.*, proj_out) are identical in both;
`proj_in`/`proj_out` are 1x1 convs in both layouts for SD1 and Linear in both for SD2
(`use_linear_in_transformer` <-> `use_linear_projection`), so no tensor is reshaped here.
The structure (L, n, which levels have attention) is read from the keys, so no config is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ldm.checkpoints._rename import KeyMap, Rule, StateDict, indices_after

# ResBlock sub-modules: openaimodel `ResBlock` (in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU,
# Linear], out_layers = [GroupNorm, SiLU, Dropout, Conv]) <-> diffusers `ResnetBlock2D`.
RESNET_SUB = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)

# Keys outside the level structure.
_FIXED_RULES = (
    Rule("time_embed.0.", "time_embedding.linear_1."),
    Rule("time_embed.2.", "time_embedding.linear_2."),
    Rule("input_blocks.0.0.", "conv_in."),
    Rule("out.0.", "conv_norm_out."),
    Rule("out.2.", "conv_out."),
    # Class-conditional UNets (`num_classes` int): nn.Embedding in both (diffusers `num_class_embeds`).
    Rule("label_emb.weight", "class_embedding.weight"),
    Rule("middle_block.0.", "mid_block.resnets.0.", RESNET_SUB),
    Rule("middle_block.1.", "mid_block.attentions.0."),
    Rule("middle_block.2.", "mid_block.resnets.1.", RESNET_SUB),
)


@dataclass(frozen=True)
class UNetLayout:
    """What the key map needs to know: levels, res blocks per level, attention in each up block."""

    num_levels: int
    layers_per_block: int
    up_has_attention: tuple[bool, ...]  # indexed by diffusers up block (deepest level first)


def unet_rules(layout: UNetLayout) -> list[Rule]:
    """All rules original -> diffusers for one UNet layout."""
    n, levels = layout.layers_per_block, layout.num_levels
    rules = list(_FIXED_RULES)
    for level in range(levels):
        for j in range(n):
            k = 1 + level * (n + 1) + j
            rules.append(Rule(f"input_blocks.{k}.0.", f"down_blocks.{level}.resnets.{j}.", RESNET_SUB))
            rules.append(Rule(f"input_blocks.{k}.1.", f"down_blocks.{level}.attentions.{j}."))
        if level < levels - 1:
            k = (level + 1) * (n + 1)
            rules.append(Rule(f"input_blocks.{k}.0.op.", f"down_blocks.{level}.downsamplers.0.conv."))
    for i in range(levels):
        # Up blocks hold n + 1 res blocks: the extra one takes the skip from the downsampler.
        for j in range(n + 1):
            k = i * (n + 1) + j
            rules.append(Rule(f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}.", RESNET_SUB))
            rules.append(Rule(f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            # The upsampler is appended to the level's last output block, after its attention if any.
            slot = 2 if layout.up_has_attention[i] else 1
            k = i * (n + 1) + n
            rules.append(Rule(f"output_blocks.{k}.{slot}.conv.", f"up_blocks.{i}.upsamplers.0.conv."))
    return rules


def layout_from_original_keys(keys: Sequence[str]) -> UNetLayout:
    """Infer the layout from original keys: the first downsampler sits at input block n + 1."""
    inputs = indices_after(keys, "input_blocks.")
    if not inputs:
        raise KeyError("UNet state dict has no input_blocks.* keys: not an original-layout UNet")
    count = inputs[-1] + 1
    ops = sorted(k for k in inputs if any(key.startswith(f"input_blocks.{k}.0.op.") for key in keys))
    n = ops[0] - 1 if ops else count - 1
    levels = count // (n + 1)
    outputs = indices_after(keys, "output_blocks.")
    if levels * (n + 1) != count or (outputs and outputs[-1] + 1 != count):
        raise ValueError(
            f"UNet keys are inconsistent: {count} input blocks, {len(outputs)} output blocks, "
            f"first downsampler at {ops[:1]}"
        )
    up_attn = []
    for i in range(levels):
        last = f"output_blocks.{i * (n + 1) + n}.1."
        up_attn.append(any(k.startswith(last) and not k.startswith(last + "conv.") for k in keys))
    return UNetLayout(levels, n, tuple(up_attn))


def layout_from_diffusers_keys(keys: Sequence[str]) -> UNetLayout:
    """Infer the layout from diffusers keys (block counts and which up blocks have attentions)."""
    levels = len(indices_after(keys, "down_blocks."))
    n = len(indices_after(keys, "down_blocks.0.resnets."))
    if levels == 0 or n == 0:
        raise KeyError("UNet state dict has no down_blocks.*.resnets.* keys: not a diffusers UNet")
    up_attn = tuple(any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in range(levels))
    return UNetLayout(levels, n, up_attn)


def unet_to_diffusers(state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> StateDict:
    """Original UNet keys (no `model.diffusion_model.` prefix) -> diffusers `UNet2DConditionModel` keys."""
    layout = layout_from_original_keys(list(state_dict))
    return KeyMap(unet_rules(layout)).apply(state_dict, what="unet_to_diffusers", strict=strict)


def unet_from_diffusers(state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> StateDict:
    """Diffusers `UNet2DConditionModel` keys -> original UNet keys (no prefix)."""
    layout = layout_from_diffusers_keys(list(state_dict))
    return KeyMap(unet_rules(layout)).inverted().apply(state_dict, what="unet_from_diffusers", strict=strict)
