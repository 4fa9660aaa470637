"""Key maps and config translations in ldm.checkpoints, checked against diffusers' own converters.

diffusers is the oracle here only (never imported by ldm/): `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint` and `convert_open_clip_checkpoint` (loaders/single_file_utils.py) take the
original layout to diffusers, so diffusers -> original (ours) -> diffusers (theirs) must give back the
identical state dict, and our original -> diffusers must agree with theirs key by key.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.checkpoints import (
    fit_clip_keys,
    infer_clip_text_config,
    normalize_clip_keys,
    open_clip_to_transformers,
    transformers_to_open_clip,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)

# Tiny UNets covering: conv vs linear projection, head count vs per-level list, 1 or 2 res blocks,
# transformer depth 2, attention missing at the top level or the bottom level (upsampler slot 1 vs 2).
UNET_CASES = {
    "sd1_like": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        use_linear_projection=False,
    ),
    "sd2_like": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=2,
    ),
    "three_levels": dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2, 4),
        use_linear_projection=True,
        upcast_attention=True,
    ),
}


def _randomized(state_dict):
    """Random values everywhere, so that a swapped pair of same-shaped tensors cannot go unnoticed."""
    return {k: torch.randn(v.shape) for k, v in state_dict.items()}


def _tiny_unet(case: str) -> UNet2DConditionModel:
    """A diffusers UNet of the named case (GroupNorm 32 as our UNet)."""
    return UNet2DConditionModel(sample_size=8, cross_attention_dim=32, norm_num_groups=32, **UNET_CASES[case])


def _assert_same(a, b):
    """Same keys, shapes and values."""
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case", sorted(UNET_CASES))
def test_unet_map_round_trips_through_diffusers_converter(case):
    """diffusers -> ours -> diffusers' converter is the identity; our forward map agrees with theirs."""
    model = _tiny_unet(case)
    diffusers_sd = _randomized(model.state_dict())
    original = unet_from_diffusers(diffusers_sd)
    assert "input_blocks.0.0.weight" in original and "out.2.weight" in original
    assert not any(k.startswith(("down_blocks", "up_blocks", "mid_block")) for k in original)

    config = dict(model.config)
    theirs = sfu.convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in original.items()}, config
    )
    _assert_same(theirs, diffusers_sd)
    _assert_same(unet_to_diffusers(original), theirs)
    _assert_same(unet_from_diffusers(unet_to_diffusers(original)), original)


def test_unet_original_key_names():
    """The original names come out where the released files have them."""
    original = unet_from_diffusers(_tiny_unet("sd1_like").state_dict())
    # SD1 layout: attention at level 0 only, 2 res blocks; level 1's output blocks have no attention,
    # so level 1's upsampler sits in slot 1 of output block 2, and proj_in stays a 1x1 conv.
    for key in (
        "time_embed.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "middle_block.1.proj_out.weight",
        "middle_block.2.out_layers.3.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.1.norm.weight",
        "out.0.weight",
    ):
        assert key in original, key
    assert original["input_blocks.1.1.proj_in.weight"].ndim == 4
    sd2 = unet_from_diffusers(_tiny_unet("sd2_like").state_dict())
    assert "output_blocks.1.2.conv.weight" in sd2 and sd2["input_blocks.1.1.proj_in.weight"].ndim == 2


def test_unet_map_rejects_unknown_keys():
    """A key outside the tables raises (strict) or is skipped (strict=False)."""
    original = unet_from_diffusers(_tiny_unet("sd1_like").state_dict())
    original["input_blocks.1.0.in_layers.7.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="in_layers.7"):
        unet_to_diffusers(original)
    relaxed = unet_to_diffusers(original, strict=False)
    assert "down_blocks.0.resnets.0.norm1.weight" in relaxed


@pytest.mark.parametrize("case", sorted(UNET_CASES))
def test_unet_config_round_trip(case):
    """diffusers config -> kwargs -> config rebuilds the same network."""
    model = _tiny_unet(case)
    kwargs = unet_config_from_diffusers(model.config)
    config = unet_config_to_diffusers(kwargs, sample_size=8)
    assert unet_config_from_diffusers(config) == kwargs
    rebuilt = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def _oracle_unet_config(kwargs):
    """diffusers' own translation from an original yaml's unet params (without -1 placeholders)."""
    params = {k: v for k, v in kwargs.items() if v != -1}
    original = {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    return sfu.create_unet_diffusers_config_from_ldm(original, {}, image_size=512)


@pytest.mark.parametrize(
    "kwargs, heads",
    [
        (dict(), 8),  # SD1 defaults
        (
            dict(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
            [5, 10, 20, 20],
        ),
    ],
)
def test_unet_config_matches_diffusers_translation(kwargs, heads):
    """Our kwargs -> config agrees with diffusers' translation of an original yaml."""
    full = {**unet_config_from_diffusers(unet_config_to_diffusers({})), **kwargs}
    ours = unet_config_to_diffusers(full, sample_size=64)
    theirs = _oracle_unet_config(full)
    assert ours["attention_head_dim"] == heads
    for key, value in theirs.items():
        if value is not None:
            assert ours[key] == value, key
    assert unet_config_from_diffusers(ours) == full


def test_unet_config_refuses_what_our_unet_lacks():
    """Options our UNet does not implement raise instead of being dropped."""
    config = dict(_tiny_unet("sd1_like").config)
    with pytest.raises(ValueError, match="norm_num_groups"):
        unet_config_from_diffusers({**config, "norm_num_groups": 16})
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_config_from_diffusers({**config, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="use_spatial_transformer"):
        unet_config_to_diffusers({"use_spatial_transformer": True})


VAE_CASES = {
    "two_levels": dict(block_out_channels=(32, 64), layers_per_block=1),
    "three_levels": dict(
        block_out_channels=(32, 32, 64), layers_per_block=2, latent_channels=3, in_channels=1
    ),
}


def _tiny_vae(case: str) -> AutoencoderKL:
    """A diffusers AutoencoderKL of the named case."""
    levels = len(VAE_CASES[case]["block_out_channels"])
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=32,
        sample_size=32,
        **VAE_CASES[case],
    )


@pytest.mark.parametrize("case", sorted(VAE_CASES))
def test_vae_map_round_trips_through_diffusers_converter(case):
    """diffusers -> ours -> diffusers' converter is the identity, with reversed up blocks."""
    model = _tiny_vae(case)
    diffusers_sd = _randomized(model.state_dict())
    original = vae_from_diffusers(diffusers_sd)
    levels = len(VAE_CASES[case]["block_out_channels"])
    # The decoder's up blocks are numbered by resolution in the original: diffusers' first is the deepest.
    assert torch.equal(
        original[f"decoder.up.{levels - 1}.block.0.conv1.weight"],
        diffusers_sd["decoder.up_blocks.0.resnets.0.conv1.weight"],
    )
    assert (
        original["encoder.mid.attn_1.q.weight"].ndim == 4 and "decoder.mid.attn_1.proj_out.bias" in original
    )

    config = dict(model.config)
    theirs = sfu.convert_ldm_vae_checkpoint(
        {"first_stage_model." + k: v for k, v in original.items()}, config
    )
    _assert_same(theirs, diffusers_sd)
    _assert_same(vae_to_diffusers(original), theirs)
    _assert_same(vae_from_diffusers(vae_to_diffusers(original)), original)


def test_vae_map_reads_legacy_attention_names():
    """Folders from diffusers < 0.14 (query/key/value/proj_attn) read the same."""
    current = _randomized(_tiny_vae("two_levels").state_dict())
    legacy = {}
    for key, value in current.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    _assert_same(vae_from_diffusers(legacy), vae_from_diffusers(current))


@pytest.mark.parametrize("case", sorted(VAE_CASES))
def test_vae_config_round_trip(case):
    """diffusers config -> kwargs -> config rebuilds the same network."""
    model = _tiny_vae(case)
    kwargs = vae_config_from_diffusers(model.config)
    config = vae_config_to_diffusers(kwargs)
    assert vae_config_from_diffusers(config) == kwargs
    rebuilt = AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_vae_config_matches_diffusers_translation():
    """Our kl-f8 kwargs -> config agrees with diffusers' translation."""
    kwargs = vae_config_from_diffusers(vae_config_to_diffusers({}))  # kl-f8 defaults
    assert kwargs["ch_mult"] == (1, 2, 4, 4) and kwargs["scale_factor"] == 0.18215
    original = {
        "model": {"params": {"scale_factor": 0.18215, "first_stage_config": {"params": {"ddconfig": kwargs}}}}
    }
    theirs = sfu.create_vae_diffusers_config_from_ldm(original, {}, image_size=256)
    ours = vae_config_to_diffusers(kwargs)
    for key, value in theirs.items():
        assert ours[key] == value, key
    with pytest.raises(ValueError, match="attn_resolutions"):
        vae_config_to_diffusers({"attn_resolutions": (16,)})


def _tiny_clip(**overrides) -> CLIPTextModel:
    """A tiny transformers CLIPTextModel (gelu, as OpenCLIP)."""
    config = CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, hidden_act="gelu", bos_token_id=0, eos_token_id=1,
        pad_token_id=1, **overrides,
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def _open_clip_sd(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """An open_clip text tower as SD2 files hold it, built with diffusers' converter as the reference."""
    ours = transformers_to_open_clip(model.state_dict())
    ours["text_projection"] = torch.randn(32, 32)
    ours["logit_scale"] = torch.tensor(4.6)
    return ours


def test_open_clip_map_matches_diffusers_and_transformers():
    """open_clip <-> transformers agrees with diffusers' converter and keeps outputs."""
    model = _tiny_clip()
    open_clip = _open_clip_sd(model)
    assert open_clip["transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert open_clip["positional_embedding"].shape == (16, 32)

    prefix = "cond_stage_model.model."
    theirs = sfu.convert_open_clip_checkpoint(
        model, {prefix + k: v for k, v in open_clip.items()}, prefix=prefix
    )
    ours = open_clip_to_transformers(open_clip)
    # diffusers drops SD2's text_projection (a CLIPTextModel has none) and logit_scale; we keep both aside.
    assert set(ours) - set(theirs) == {"text_projection.weight", "logit_scale"}
    theirs.pop("text_projection.weight", None)
    _assert_same({k: v for k, v in ours.items() if k in theirs}, theirs)
    assert torch.equal(ours["text_projection.weight"], open_clip["text_projection"].t())

    # Both ways lossless, and the mapped weights reproduce the model exactly.
    _assert_same(transformers_to_open_clip(ours), open_clip)
    fitted, leftover = fit_clip_keys(ours, model.state_dict().keys())
    assert set(leftover) == {"text_projection.weight", "logit_scale"}
    clone = _tiny_clip()
    clone.load_state_dict(fitted, strict=True)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(clone(ids).last_hidden_state, model(ids).last_hidden_state)


def test_clip_key_normalization():
    """Any CLIP key convention normalizes to `text_model.*`; configs read off shapes."""
    model = _tiny_clip()
    sd = model.state_dict()
    canonical = normalize_clip_keys(sd)
    assert all(k.startswith("text_model.") for k in canonical)
    # Old SD1 files: no `text_model.` and a persistent position_ids buffer.
    old = {k.removeprefix("text_model."): v for k, v in canonical.items()}
    old["embeddings.position_ids"] = torch.arange(16)[None]
    _assert_same(normalize_clip_keys(old), canonical)
    fitted, leftover = fit_clip_keys(old, sd.keys())
    assert not leftover and sorted(fitted) == sorted(sd)

    config = infer_clip_text_config(canonical, hidden_act="gelu")
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "max_position_embeddings",
    ):
        assert config[key] == getattr(model.config, key), key
    with pytest.raises(KeyError, match="no counterpart"):
        transformers_to_open_clip({**canonical, "text_model.encoder.layers.0.extra.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    "kwargs, params",
    [
        (dict(), 859_520_964),  # SD1 (CompVis v1-inference.yaml: 859.52 M)
        (
            dict(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
            865_910_724,
        ),
    ],
)
def test_full_size_configs_give_the_published_networks(kwargs, params):
    # Built on the meta device: shapes only, no memory. Our config translation must produce diffusers'
    # SD1/SD2 UNet with the published parameter count and the released single files' 686 UNet keys.
    """SD1/SD2 kwargs give the published UNets (parameter counts, 686 keys)."""
    config = unet_config_to_diffusers(kwargs)
    with torch.device("meta"):
        model = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    original = unet_from_diffusers(model.state_dict())
    assert len(original) == 686 and sum(v.numel() for v in original.values()) == params
    upsamplers = sorted(k for k in original if k.startswith("output_blocks") and k.endswith("conv.weight"))
    assert upsamplers == [
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight",
    ]
    assert sorted(unet_to_diffusers(original)) == sorted(model.state_dict())


def test_full_size_autoencoder_config():
    """kl-f8 kwargs give the published autoencoder (parameter count)."""
    config = vae_config_to_diffusers({})
    with torch.device("meta"):
        model = AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})
    original = vae_from_diffusers(model.state_dict())
    assert sum(v.numel() for v in original.values()) == 83_653_863  # CompVis kl-f8
    assert (
        "decoder.up.3.upsample.conv.weight" in original
        and "decoder.up.0.upsample.conv.weight" not in original
    )
