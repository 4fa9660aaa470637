"""FID, KID and CLIP score of `ldm.eval.metrics` against their reference formulas; reference statistics from
folders, shards and pytorch-fid .npz files, and their cache."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ldm.eval.metrics import ClipScorer, FeatureStats, extract, fid, kid, load_clip, to_uint8
from ldm.eval.reference import reference_stats
from tests.eval_tiny import TinyFeatures, save_tiny_clip


def frechet_distance_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's `calculate_frechet_distance` (mseitzer/pytorch-fid, fid_score.py): float64,
    scipy.linalg.sqrtm, an eps offset when the product is singular, the real part kept."""
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def smooth_images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """Blurry random colour fields: images with structure, unlike white noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return [Image.fromarray(s).resize((size, size), Image.BICUBIC) for s in small]


def test_fid_equals_pytorch_fid_formula_and_is_zero_against_itself():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 24, generator=g, dtype=torch.float64)
    b = 0.8 * torch.randn(250, 24, generator=g, dtype=torch.float64) + 0.3
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    # The statistics are float64 mean and unbiased covariance.
    assert np.allclose(sa.sigma, np.cov(a.numpy(), rowvar=False)) and sa.mu.dtype == np.float64
    ref = frechet_distance_reference(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert fid(sa, sb) == pytest.approx(ref, rel=1e-6)
    assert abs(fid(sa, sa)) < 1e-8


def test_fid_grows_with_noise():
    extractor = TinyFeatures()
    clean = smooth_images(64)
    ref = FeatureStats.from_features(extract(extractor, to_uint8(clean, None)))
    rng = np.random.default_rng(1)
    fids = []
    for sigma in (0, 8, 24, 48, 96):
        noisy = [
            np.clip(np.asarray(im) + rng.normal(0, sigma, (32, 32, 3)), 0, 255).astype(np.uint8)
            for im in clean
        ]
        feats = extract(extractor, to_uint8([Image.fromarray(x) for x in noisy], None))
        fids.append(fid(ref, FeatureStats.from_features(feats)))
    assert abs(fids[0]) < 1e-8
    assert all(x < y for x, y in zip(fids, fids[1:])), fids


def test_kid_is_seeded_and_near_zero_against_itself():
    g = torch.Generator().manual_seed(0)
    a = FeatureStats.from_features(torch.randn(80, 8, generator=g, dtype=torch.float64))
    b = FeatureStats.from_features(torch.randn(80, 8, generator=g, dtype=torch.float64) + 1.0)
    same, other = kid(a, a, subsets=20, subset_size=40, seed=3), kid(a, b, subsets=20, subset_size=40, seed=3)
    assert abs(same[0]) < 0.05 * other[0] and other[2] == 40
    assert kid(a, b, subsets=20, subset_size=40, seed=3) == other  # same seed, same subsets
    assert kid(a, b, subsets=20, subset_size=500)[2] == 80  # the subset size is capped at the set size


def test_clip_score_equals_direct_computation(tmp_path):
    path = save_tiny_clip(tmp_path / "clip")
    images = to_uint8(smooth_images(3, size=48, seed=5), None)
    captions = ["a photo of the digit one", "a photo of the digit two", "a photo"]
    total, n = ClipScorer(path).batch(images, captions)

    model, processor = load_clip(path)
    with torch.no_grad():
        pixels = processor(images=[im for im in images], return_tensors="pt")["pixel_values"]
        img = model.vision_model(pixel_values=pixels).pooler_output
        img = model.visual_projection(img)
        tokens = processor(text=captions, return_tensors="pt", padding=True)
        txt = model.text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        txt = model.text_projection(txt)
    direct = 100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert n == 3
    assert total == pytest.approx(float(direct.sum()), rel=1e-5, abs=1e-4)


def write_shards(path, images, captions):
    with tarfile.open(path, "w") as tar:
        for i, (img, cap) in enumerate(zip(images, captions)):
            for ext, data in (("png", _png(img)), ("txt", cap.encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_reference_stats_folder_shards_npz_and_cache(tmp_path):
    images = smooth_images(12, size=40)
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, img in enumerate(images):
        img.save(folder / f"{i:03d}.png")
    write_shards(tmp_path / "ref-000000.tar", images, [f"caption {i}" for i in range(12)])
    extractor, cache = TinyFeatures(), tmp_path / "cache"

    stats, info = reference_stats(str(folder), extractor, image_size=32, cache_dir=cache)
    assert info["cached"] is False and info["n"] == 12
    again, info2 = reference_stats(str(folder), extractor, image_size=32, cache_dir=cache)
    assert info2["cached"] is True and info2["stats_hash"] == info["stats_hash"]
    assert np.array_equal(again.sigma, stats.sigma) and np.array_equal(again.features, stats.features)
    # Resized with the stated filter: the same as extracting from the PIL-bicubic 32 px images by hand.
    by_hand = extract(extractor, to_uint8(images, 32))
    assert np.allclose(stats.mu, by_hand.numpy().mean(0))
    # The key follows the preprocessing, the count and the extractor.
    assert reference_stats(str(folder), extractor, image_size=24, cache_dir=cache)[1]["cached"] is False
    assert reference_stats(str(folder), extractor, image_size=32, n=6, cache_dir=cache)[1]["n"] == 6
    assert (
        reference_stats(str(folder), TinyFeatures(seed=1), image_size=32, cache_dir=cache)[1]["cached"]
        is False
    )

    shards, _ = reference_stats(
        str(tmp_path / "ref-{000000..000000}.tar"), extractor, image_size=32, cache_dir=cache
    )
    assert np.allclose(shards.sigma, stats.sigma) and np.allclose(shards.mu, stats.mu)

    # pytorch-fid's format: mu and sigma only, so FID but no KID.
    np.savez(tmp_path / "published.npz", mu=stats.mu, sigma=stats.sigma)
    published, pinfo = reference_stats(
        str(tmp_path / "published.npz"), extractor, image_size=32, cache_dir=cache
    )
    assert published.features is None and pinfo["kind"] == "npz"
    gen = FeatureStats.from_features(extract(extractor, to_uint8(smooth_images(10, seed=9), 32)))
    # Rebuilt from mu and sigma with n=2 instead of 12: float64 round-off, which FID's cancellation
    # (||mu1 - mu2||^2 + traces of large matrices, here ~0.03) lifts to ~1e-9 of the result.
    assert fid(published, gen) == pytest.approx(fid(stats, gen), rel=1e-7)
    assert kid(published, gen) is None

    with pytest.raises(FileNotFoundError, match="ref="):
        reference_stats(str(tmp_path / "nothing"), extractor, image_size=32, cache_dir=cache)
