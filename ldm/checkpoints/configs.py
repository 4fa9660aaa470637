"""Constructor arguments (CompVis names) <-> diffusers `config.json` for the UNet and the autoencoder.

The translation follows diffusers `create_unet_diffusers_config_from_ldm` and
`create_vae_diffusers_config_from_ldm` (loaders/single_file_utils.py), written both ways. Anything a
diffusers config can express that our networks cannot (other norm groups, class-embedding kinds,
time-embedding variants, ...) raises ValueError instead of being dropped, because a silently different
network would load and produce wrong images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The defaults of `ldm.nn.unet.UNetModel` (SD1 v1-inference.yaml); keep in step with its signature.
UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": 2,
    "attention_resolutions": (4, 2, 1),
    "channel_mult": (1, 2, 4, 4),
    "num_heads": 8,
    "num_head_channels": -1,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "dropout": 0.0,
    "upcast_attention": False,
    "num_classes": None,
}
# The defaults of `ldm.nn.autoencoder.AutoencoderKL` (kl-f8).
VAE_DEFAULTS: dict[str, Any] = {
    "embed_dim": 4,
    "z_channels": 4,
    "double_z": True,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": (1, 2, 4, 4),
    "num_res_blocks": 2,
    "attn_resolutions": (),
    "resolution": 256,
    "dropout": 0.0,
    "scale_factor": 0.18215,
}
# Arguments that change how a network runs, not which weights it has; not part of a diffusers config.
RUNTIME_ONLY = frozenset({"_target_", "use_checkpoint", "use_fp16"})

# diffusers UNet2DConditionModel options our UNet does not have: the only value we can accept for each.
_UNET_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
}
_VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def _merged(kwargs: Mapping[str, Any], defaults: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Constructor kwargs over the defaults; unknown names raise, since we cannot translate them."""
    given = {k: v for k, v in kwargs.items() if k not in RUNTIME_ONLY}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{what}: no diffusers equivalent known for argument(s) {unknown}")
    return {**defaults, **given}


def _check_fixed(config: Mapping[str, Any], fixed: Mapping[str, Any], what: str) -> None:
    """Raise when a diffusers config uses an option our network does not implement."""
    for key, allowed in fixed.items():
        value = config.get(key, allowed)
        if value != allowed:
            raise ValueError(f"{what}: {key}={value!r} is not supported (our network implements {allowed!r})")


def _uniform(value: Any) -> Any:
    """A list whose entries are all equal collapses to its entry; anything else is returned as is."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(set(value)) == 1 else list(value)
    return value


def unet_config_to_diffusers(kwargs: Mapping[str, Any], *, sample_size: int = 64) -> dict[str, Any]:
    """`UNetModel` kwargs -> `UNet2DConditionModel` config (sample_size: latent side, image side / 8)."""
    k = _merged(kwargs, UNET_DEFAULTS, "unet_config_to_diffusers")
    if k["context_dim"] is None:
        raise ValueError(
            "unet_config_to_diffusers: a UNet without cross-attention (context_dim=None) is not supported"
        )
    channels = [k["model_channels"] * m for m in k["channel_mult"]]
    attention = {int(r) for r in k["attention_resolutions"]}
    has_attn = [2**level in attention for level in range(len(channels))]
    if k["num_head_channels"] == -1:
        # diffusers' `attention_head_dim` is, for historical reasons, the number of heads (SD1: 8).
        heads: int | list[int] = int(k["num_heads"])
    else:
        hc = int(k["num_head_channels"])
        if any(c % hc for c in channels):
            raise ValueError(
                f"unet_config_to_diffusers: channels {channels} not divisible by num_head_channels={hc}"
            )
        heads = [c // hc for c in channels]  # SD2: [5, 10, 20, 20]
    depth = k["transformer_depth"]
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": k["in_channels"],
        "out_channels": k["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "block_out_channels": channels,
        "layers_per_block": k["num_res_blocks"],
        "cross_attention_dim": k["context_dim"],
        "attention_head_dim": heads,
        "transformer_layers_per_block": list(depth) if isinstance(depth, (list, tuple)) else depth,
        "use_linear_projection": bool(k["use_linear_in_transformer"]),
        "upcast_attention": bool(k["upcast_attention"]),
        "dropout": k["dropout"],
        "only_cross_attention": False,
        **_UNET_FIXED,
    }
    if k["num_classes"] is not None:
        if not isinstance(k["num_classes"], int):
            raise ValueError(f"unet_config_to_diffusers: num_classes={k['num_classes']!r} is not supported")
        config["num_class_embeds"] = k["num_classes"]
    return config


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`UNet2DConditionModel` config -> `UNetModel` kwargs (`num_classes` only when class-conditional)."""
    what = "unet_config_from_diffusers"
    _check_fixed(config, _UNET_FIXED, what)
    if _uniform(config.get("only_cross_attention", False)) is not False:
        raise ValueError(f"{what}: only_cross_attention is not supported")
    channels = list(config["block_out_channels"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise ValueError(f"{what}: down_block_types {down} not supported")
    has_attn = [t == "CrossAttnDownBlock2D" for t in down]
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)]
    if up != expected_up:
        raise ValueError(f"{what}: up_block_types {up} do not mirror down_block_types {down}")
    if not isinstance(config.get("layers_per_block", 2), int):
        raise ValueError(f"{what}: a per-level layers_per_block is not supported")
    mc = channels[0]
    if any(c % mc for c in channels):
        raise ValueError(f"{what}: block_out_channels {channels} are not multiples of the first")
    # diffusers: num_attention_heads = num_attention_heads or attention_head_dim (the head count).
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    # Only levels with attention and the mid block (deepest level) use a head count.
    used = [i for i, a in enumerate(has_attn) if a] + [len(channels) - 1]
    counts = {heads[i] for i in used}
    widths = {channels[i] // heads[i] for i in used}
    if len(counts) == 1:
        num_heads, num_head_channels = counts.pop(), -1
    elif len(widths) == 1 and all(channels[i] % heads[i] == 0 for i in used):
        num_heads, num_head_channels = -1, widths.pop()
    else:
        raise ValueError(f"{what}: heads {heads} are neither a fixed count nor a fixed width per head")
    kwargs = {
        "in_channels": config.get("in_channels", 4),
        "out_channels": config.get("out_channels", 4),
        "model_channels": mc,
        "num_res_blocks": config.get("layers_per_block", 2),
        # Downsampling factors 2**level that get a SpatialTransformer, written as in the yaml files (4, 2, 1).
        "attention_resolutions": tuple(sorted((2**i for i, a in enumerate(has_attn) if a), reverse=True)),
        "channel_mult": tuple(c // mc for c in channels),
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
        "transformer_depth": _uniform(config.get("transformer_layers_per_block", 1)),
        "context_dim": config.get("cross_attention_dim", 1280),
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "dropout": config.get("dropout", 0.0),
        "upcast_attention": bool(config.get("upcast_attention", False)),
    }
    if config.get("num_class_embeds") is not None:
        kwargs["num_classes"] = config["num_class_embeds"]
    return kwargs


def vae_config_to_diffusers(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`AutoencoderKL` kwargs -> diffusers `AutoencoderKL` config (dropout has no diffusers field)."""
    what = "vae_config_to_diffusers"
    k = _merged(kwargs, VAE_DEFAULTS, what)
    if not k["double_z"] or k["embed_dim"] != k["z_channels"]:
        # diffusers ties both to latent_channels (quant_conv: 2z -> 2z).
        raise ValueError(f"{what}: needs double_z=True and embed_dim == z_channels, got {k}")
    if tuple(k["attn_resolutions"]):
        raise ValueError(
            f"{what}: attention outside the mid block (attn_resolutions) has no diffusers equivalent"
        )
    levels = len(k["ch_mult"])
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": k["in_channels"],
        "out_channels": k["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [k["ch"] * m for m in k["ch_mult"]],
        "layers_per_block": k["num_res_blocks"],
        "latent_channels": k["z_channels"],
        "sample_size": k["resolution"],
        "scaling_factor": k["scale_factor"],
        "force_upcast": True,
        **_VAE_FIXED,
    }


def vae_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Diffusers `AutoencoderKL` config -> `AutoencoderKL` kwargs."""
    what = "vae_config_from_diffusers"
    _check_fixed(config, _VAE_FIXED, what)
    channels = list(config["block_out_channels"])
    if set(config.get("down_block_types", ["DownEncoderBlock2D"])) != {"DownEncoderBlock2D"} or set(
        config.get("up_block_types", ["UpDecoderBlock2D"])
    ) != {"UpDecoderBlock2D"}:
        raise ValueError(f"{what}: only DownEncoderBlock2D / UpDecoderBlock2D are supported")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"{what}: block_out_channels {channels} are not multiples of the first")
    latent = config.get("latent_channels", 4)
    return {
        "embed_dim": latent,
        "z_channels": latent,
        "double_z": True,
        "in_channels": config.get("in_channels", 3),
        "out_ch": config.get("out_channels", 3),
        "ch": ch,
        "ch_mult": tuple(c // ch for c in channels),
        "num_res_blocks": config.get("layers_per_block", 1),
        "attn_resolutions": (),
        "resolution": config.get("sample_size", 32),
        "dropout": 0.0,
        "scale_factor": config.get("scaling_factor", 0.18215),
    }
