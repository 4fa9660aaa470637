"""Autoencoder state dict: original CompVis `AutoencoderKL` keys <-> diffusers `AutoencoderKL`.

Correspondence (diffusers `loaders/single_file_utils.py` `convert_ldm_vae_checkpoint` and
`scripts/convert_diffusers_to_original_stable_diffusion.py` `vae_conversion_map`), L levels:
  encoder.down.l.block.j            <-> encoder.down_blocks.l.resnets.j       (nin_shortcut <-> conv_shortcut)
  encoder.down.l.downsample.conv    <-> encoder.down_blocks.l.downsamplers.0.conv
  decoder.up.(L-1-i).block.j        <-> decoder.up_blocks.i.resnets.j         (order reversed: the original
  decoder.up.(L-1-i).upsample.conv  <-> decoder.up_blocks.i.upsamplers.0.conv  indexes by resolution)
  {en,de}coder.mid.block_1/attn_1/block_2 <-> mid_block.resnets.0/attentions.0/resnets.1
  {en,de}coder.norm_out             <-> conv_norm_out
The mid-block attention's q/k/v/proj_out are 1x1 convs (C, C, 1, 1) in the original and Linear (C, C)
(`to_q`, `to_k`, `to_v`, `to_out.0`, norm `group_norm`) in diffusers, so their weights are reshaped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ldm.checkpoints._rename import KeyMap, Rule, StateDict, indices_after

_RESNET_SUB = (
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("nin_shortcut.", "conv_shortcut."),
)
_ATTN_SUB = (
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
)
# diffusers < 0.14 named the attention `query/key/value/proj_attn`; such folders still exist on disk.
_LEGACY_DIFFUSERS_ATTN_SUB = (
    ("group_norm.", "norm."),
    ("query.", "q."),
    ("key.", "k."),
    ("value.", "v."),
    ("proj_attn.", "proj_out."),
)
_ATTN_LINEARS = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


def vae_rules(num_levels: int, max_blocks: int) -> list[Rule]:
    """Rules original -> diffusers for `num_levels` levels of up to `max_blocks` res blocks."""
    rules = [
        Rule("quant_conv.", "quant_conv."),
        Rule("post_quant_conv.", "post_quant_conv."),
    ]
    for part in ("encoder", "decoder"):
        rules += [
            Rule(f"{part}.conv_in.", f"{part}.conv_in."),
            Rule(f"{part}.conv_out.", f"{part}.conv_out."),
            Rule(f"{part}.norm_out.", f"{part}.conv_norm_out."),
            Rule(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _RESNET_SUB),
            Rule(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _RESNET_SUB),
            Rule(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _ATTN_SUB),
        ]
    for level in range(num_levels):
        up = num_levels - 1 - level  # diffusers up block holding this resolution
        for j in range(max_blocks):
            rules.append(
                Rule(
                    f"encoder.down.{level}.block.{j}.",
                    f"encoder.down_blocks.{level}.resnets.{j}.",
                    _RESNET_SUB,
                )
            )
            rules.append(
                Rule(f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}.", _RESNET_SUB)
            )
        rules.append(
            Rule(
                f"encoder.down.{level}.downsample.conv.", f"encoder.down_blocks.{level}.downsamplers.0.conv."
            )
        )
        rules.append(Rule(f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv."))
    return rules


def _layout(keys: Sequence[str], down: str, up: str, block: str) -> tuple[int, int]:
    """(levels, most res blocks in any level) from keys, for either layout."""
    levels = len(indices_after(keys, down))
    if levels == 0:
        raise KeyError(f"autoencoder state dict has no {down}* keys")
    blocks = [i for lv in range(levels) for i in indices_after(keys, f"{up}{lv}.{block}")]
    return levels, max(blocks, default=0) + 1


def vae_to_diffusers(state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> StateDict:
    """Original autoencoder keys (no `first_stage_model.` prefix) -> diffusers `AutoencoderKL` keys."""
    levels, blocks = _layout(list(state_dict), "encoder.down.", "decoder.up.", "block.")
    out = KeyMap(vae_rules(levels, blocks)).apply(state_dict, what="vae_to_diffusers", strict=strict)
    for key, value in out.items():
        if key.endswith(_ATTN_LINEARS) and ".mid_block.attentions." in key and value.ndim == 4:
            out[key] = value[:, :, 0, 0]  # 1x1 conv -> linear
    return out


def vae_from_diffusers(state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> StateDict:
    """Diffusers `AutoencoderKL` keys (current or legacy attention names) -> original autoencoder keys."""
    levels, blocks = _layout(list(state_dict), "encoder.down_blocks.", "decoder.up_blocks.", "resnets.")
    inverse = KeyMap(vae_rules(levels, blocks)).inverted()
    # Accept the legacy attention names as well: same prefixes, extra sub-key entries.
    rules = [
        Rule(r.src, r.dst, r.sub + _LEGACY_DIFFUSERS_ATTN_SUB) if ".mid_block.attentions." in r.src else r
        for r in inverse.rules
    ]
    out = KeyMap(rules).apply(state_dict, what="vae_from_diffusers", strict=strict)
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(
            (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")
        ):
            if value.ndim == 2:
                out[key] = value[:, :, None, None]  # linear -> 1x1 conv
            elif value.ndim == 3:
                out[key] = value[:, :, :, None]  # legacy conv1d-shaped proj_attn
    return out
