"""Our networks against diffusers on the same weights: parameter counts, key layout, outputs.

The weights travel through diffusers' own single-file converter (original SD key names -> diffusers), so
these tests check both that our modules produce the released checkpoints' key layout and that they compute
what diffusers computes. Full-size parameter counts are taken on the `meta` device (no memory, no download).
"""

import pytest
import torch

from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.unet import UNetModel
from tests.tiny import randomize_, rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, 859_520_964),  # SD1.5
        (
            dict(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
            865_910_724,
        ),
    ],
    ids=["sd15", "sd21"],
)
def test_unet_parameter_count_full_size(kwargs, expected):
    with torch.device("meta"):
        assert n_params(UNetModel(**kwargs)) == expected


def test_autoencoder_parameter_count_kl_f8():
    with torch.device("meta"):
        assert n_params(AutoencoderKL()) == 83_653_863


# (ours, diffusers) pairs describing the same architecture.
UNET_CASES = {
    # SD1-shaped but narrow: 3 levels, attention on the first two, 1x1-conv projections, head count 8.
    "sd1_tiny": (
        dict(
            model_channels=32,
            channel_mult=(1, 2, 2),
            attention_resolutions=(1, 2),
            num_res_blocks=1,
            num_heads=8,
            context_dim=32,
        ),
        dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ),
    ),
    # The full SD1 layout (4 levels, 2 res blocks, attention at factors 4, 2, 1), narrow channels.
    "sd1_small": (
        dict(
            model_channels=32,
            channel_mult=(1, 2, 4, 4),
            attention_resolutions=(4, 2, 1),
            num_res_blocks=2,
            num_heads=4,
            context_dim=48,
            transformer_depth=2,
        ),
        dict(
            block_out_channels=(32, 64, 128, 128),
            layers_per_block=2,
            cross_attention_dim=48,
            attention_head_dim=4,
            transformer_layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
    ),
    # SD2-shaped: head width 64, linear projections, attention upcast.
    "sd2_small": (
        dict(
            model_channels=64,
            channel_mult=(1, 2, 2),
            attention_resolutions=(1, 2),
            num_res_blocks=1,
            num_heads=-1,
            num_head_channels=64,
            use_linear_in_transformer=True,
            context_dim=40,
            upcast_attention=True,
        ),
        dict(
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            cross_attention_dim=40,
            attention_head_dim=(1, 2, 2),
            use_linear_projection=True,
            upcast_attention=True,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ),
    ),
}


@pytest.mark.parametrize("case", list(UNET_CASES))
@pytest.mark.parametrize("lowering", ["rule", "every_conv"])
def test_unet_matches_diffusers(case, lowering, monkeypatch):
    """`every_conv`: every convolution of ours runs through ldm/nn/conv.py's im2col + GEMM lowering (which
    the rule keeps for SD's large, low-resolution layers only), to show that path computes the same."""
    if lowering == "every_conv":
        monkeypatch.setattr("ldm.nn.conv.MIN_WEIGHT", 0)
        monkeypatch.setattr("ldm.nn.conv.MAX_POSITIONS", 10**9)
    ours_kwargs, theirs_kwargs = UNET_CASES[case]
    ours = randomize_(UNetModel(in_channels=4, out_channels=4, **ours_kwargs)).eval()
    theirs = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, **theirs_kwargs
    ).eval()
    assert n_params(ours) == n_params(theirs)
    original = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(original, theirs.config)
    theirs.load_state_dict(converted, strict=True)  # every key of ours has a place in diffusers and back

    ctx_dim = ours_kwargs["context_dim"]
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([3, 917])
    context = torch.randn(2, 7, ctx_dim)
    with torch.no_grad():
        a = ours(x, t, context)
        b = theirs(x, t, encoder_hidden_states=context).sample
    assert a.shape == x.shape
    assert rel_err(a, b) < 1e-5


def test_unet_odd_latent_size_matches_diffusers():
    """Latents whose side is not divisible by 2**levels (e.g. 72 px -> 9x9) upsample to the skip's size."""
    ours_kwargs, theirs_kwargs = UNET_CASES["sd1_tiny"]
    ours = randomize_(UNetModel(**ours_kwargs)).eval()
    theirs = diffusers.UNet2DConditionModel(**theirs_kwargs).eval()
    theirs.load_state_dict(
        convert_ldm_unet_checkpoint(
            {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}, theirs.config
        )
    )
    x, ctx = torch.randn(1, 4, 9, 11), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert rel_err(ours(x, 400.0, ctx), theirs(x, 400, encoder_hidden_states=ctx).sample) < 1e-5


VAE_CASES = {
    "tiny": (
        dict(ch=32, ch_mult=(1, 2), num_res_blocks=1),
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        ),
    ),
    # SD-shaped: four levels, two res blocks, narrow.
    "sd_small": (
        dict(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=2),
        dict(
            block_out_channels=(32, 64, 64, 128),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        ),
    ),
}


@pytest.mark.parametrize("case", list(VAE_CASES))
def test_autoencoder_matches_diffusers(case):
    ours_kwargs, theirs_kwargs = VAE_CASES[case]
    ours = randomize_(AutoencoderKL(embed_dim=4, z_channels=4, **ours_kwargs)).eval()
    theirs = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **theirs_kwargs).eval()
    assert n_params(ours) == n_params(theirs)
    converted = convert_ldm_vae_checkpoint(
        {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}, theirs.config
    )
    theirs.load_state_dict(converted, strict=True)

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post_a, post_b = ours.encode(x), theirs.encode(x).latent_dist
        assert rel_err(post_a.mean, post_b.mean) < 1e-5
        assert rel_err(post_a.std, post_b.std) < 1e-5
        z = torch.randn(2, 4, 32 // ours.downsampling_factor, 32 // ours.downsampling_factor)
        assert rel_err(ours.decode(z), theirs.decode(z).sample) < 1e-5


def test_gradient_checkpointing_gives_same_gradients():
    ours_kwargs, _ = UNET_CASES["sd1_tiny"]
    net = randomize_(UNetModel(**ours_kwargs))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 32)

    def grads():
        net.zero_grad()
        net(x, t, ctx).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    net.set_gradient_checkpointing(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in net.modules())
    for g0, g1 in zip(plain, grads()):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_unet_rejects_bad_config():
    with pytest.raises(ValueError, match="num_head_channels"):
        UNetModel(num_heads=-1, num_head_channels=-1)
    with pytest.raises(ValueError, match="multiple of 32"):
        UNetModel(model_channels=20, channel_mult=(1,))
    with pytest.raises(ValueError, match="transformer_depth"):
        UNetModel(model_channels=32, channel_mult=(1, 2), transformer_depth=[1, 1, 1])
