"""Digits realism: the `DigitsFeatures` classifier trains deterministically and reads held-out real digits;
the digits FID is small for real digits and grows with the noise added to them; the recommended sampling
settings travel with a saved model and `sample.py` uses them unless the command line gives its own."""

from __future__ import annotations

import json

import pytest
import torch

import ldm
from ldm.eval import digits
from ldm.eval.digits_features import DigitsFeatures, _trained_state, digits_split, split_images
from tests.test_sample_script import run_sample

RECOMMENDED = {"sampler": "euler", "steps": 2, "guidance_scale": 2.5}


@pytest.fixture(scope="module")
def features():
    return DigitsFeatures()


def test_digits_features_train_deterministically():
    """Two trainings from scratch (one epoch: the order and the arithmetic are the same for more) give
    bit-identical weights."""
    first = {k: v.clone() for k, v in _trained_state(0, 64, 1).items()}
    _trained_state.cache_clear()
    second = _trained_state(0, 64, 1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_digits_features_classify_held_out_digits(features):
    images, labels = split_images("heldout")  # as the shards store them, 32 px
    accuracy = (features.logits(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.93  # measured 0.966 (179 held-out digits, default recipe)
    out = features(images[:5])
    assert out.dtype == torch.float32 and out.shape == (5, features.num_features)
    # uint8 0..255 and float 0..1 inputs are the same images; any size is resized to the same input.
    torch.testing.assert_close(features(images[:5].float() / 255), out)
    assert features.identity.startswith("digits-cnn16-v1")


def test_digits_fid_real_vs_real_small_and_monotone_in_noise(features):
    heldout = digits.heldout_by_class()
    g = torch.Generator().manual_seed(0)

    def noised(sigma: float) -> dict[int, torch.Tensor]:
        out = {}
        for c, x in heldout.items():
            noise = torch.randn(x.shape, generator=g) * sigma * 255
            out[c] = (x.float() + noise).clamp(0, 255).round().to(torch.uint8)
        return out

    fids, real = [], None
    for sigma in (0.05, 0.15, 0.3):
        result = digits.digits_fid(noised(sigma), features=features)
        real = result["real_vs_real"]["fid"]
        fids.append(result["generated"]["fid"])
    assert result["images_per_set"] == len(digits_split(0)[1]) and result["reference_images"] > 1500
    assert real < 1.0 and fids[0] > real  # measured: real vs real 0.43
    assert fids[0] < fids[1] < fids[2]
    assert fids[2] > 5 * real


def test_recommended_settings_round_trip_through_files(tiny_sd_folder, tmp_path):
    pipe = ldm.load_pipeline(tiny_sd_folder)
    assert pipe.recommended == {}  # a diffusers folder says nothing
    pipe.recommended = dict(RECOMMENDED)
    for fmt in ("ldm", "single_file"):
        again = ldm.load_pipeline(pipe.save(tmp_path / fmt, format=fmt))
        assert again.recommended == RECOMMENDED, fmt
    assert again.sampling_settings() == RECOMMENDED
    assert again.sampling_settings(guidance_scale=7.0)["guidance_scale"] == 7.0
    assert again.sampling_settings(sampler="ddim") == dict(RECOMMENDED, sampler="ddim")
    with pytest.raises(ValueError, match="recommended.*unknown key"):
        ldm.pipeline.Pipeline(pipe.unet, pipe.vae, pipe.conditioner, pipe.schedule, recommended={"cfg": 3})
    with pytest.raises(ValueError, match="steps"):
        ldm.pipeline.check_sampling({"steps": 0})


@pytest.fixture(scope="module")
def recommended_export(tiny_sd_folder, tmp_path_factory):
    pipe = ldm.load_pipeline(tiny_sd_folder)
    pipe.recommended = dict(RECOMMENDED)
    return pipe.save(tmp_path_factory.mktemp("rec") / "model", format="ldm")


def test_sample_script_uses_the_recommended_settings(recommended_export, tmp_path):
    """Nothing given: the model's sampler, steps and guidance scale, recorded in metadata.jsonl (what a
    given sampler=, steps= or guidance_scale= does is the next test's, without a subprocess)."""
    out = tmp_path / "out"
    proc = run_sample(f"ckpt={recommended_export}", "prompt=a photo of the digit one", f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr
    (record,) = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert (record["sampler"], record["steps"], record["guidance_scale"]) == ("euler", 2, 2.5)


def test_sample_script_choice_of_sampler_overrides_the_recommended(recommended_export):
    """sampler=NAME takes that sampler's config (its steps, options) unless steps= is given."""
    from hydra import compose, initialize_config_dir

    from ldm.generate import sampling_choice
    from tests.tiny import REPO

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        chosen = compose("sample", overrides=["ckpt=x", "sampler=euler_a"])
        plain = compose("sample", overrides=["ckpt=x"])
        given = compose(
            "sample", overrides=["ckpt=x", "sampler=dpmpp_2m_karras", "steps=7", "guidance_scale=4"]
        )
    sampler, steps, scale = sampling_choice(chosen, RECOMMENDED)
    assert (sampler["name"], sampler["options"]["eta"], steps, scale) == ("euler_a", 1.0, 30, 2.5)
    sampler, steps, scale = sampling_choice(given, RECOMMENDED)
    assert (sampler["name"], sampler["karras"], steps, scale) == ("dpmpp_2m", True, 7, 4.0)
    sampler, steps, scale = sampling_choice(plain, {})  # a model that recommends nothing
    assert (sampler["name"], steps, scale) == ("dpmpp_2m", 20, 7.5)
    sampler, steps, scale = sampling_choice(plain, {"sampler": "dpmpp_2m_karras"})
    assert (sampler["name"], sampler["karras"], steps) == ("dpmpp_2m", True, 20)
