"""Does a digits model draw the digit it is asked for, and draw it like the real ones? Accuracy of a
classifier trained on real digits, and a "digits FID" (with KID) in the feature space of `DigitsFeatures`.

The classifier (scikit-learn SVC, RBF kernel) is fit on the training split of scikit-learn's 8x8 digits;
generated 32 px images are brought back to that format (grey, 8x8 by area averaging, 0-16 levels) and
classified. The same reduction applied to the held-out real digits, after their trip through the shard
writer's upscaling, gives the ceiling to compare with.

Accuracy only says the digits are readable; strong guidance buys it with less varied, less natural
strokes. The digits FID (Heusel et al. 2017, in the penultimate features of `ldm.eval.digits_features`'s
small CNN instead of Inception) compares the generated digits with the training split's real ones, at the
same per-class counts as the held-out real digits, whose own FID against the training digits
("real vs real") is the floor a perfect generator reaches at that sample size. KID (Binkowski et al.
2018) is the unbiased companion.

    python -m ldm.eval.digits CKPT [--n 50 --steps S --sampler NAME --guidance-scale G --seed 0]

Sampler, steps and guidance scale default to the model's recommended settings (`Pipeline.recommended`,
written by training), else dpmpp_2m, 20 steps, guidance 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def to_digit_features(images: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W images in [0, 1] -> N x 64 features like sklearn's digits (8x8 grey, 0..16)."""
    grey = images.float().mean(dim=1, keepdim=True)
    small = F.adaptive_avg_pool2d(grey, 8)
    return (small.flatten(1) * 16.0).clamp(0, 16).numpy()


def fit_classifier(seed: int = 0):
    """An SVC on the training split of sklearn's digits (the split `ldm.data.digits` uses)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from ldm.data.digits import split_digits

    digits = load_digits()
    train, val = split_digits(digits.target, 0.1, seed)
    clf = SVC(gamma=0.001, C=10.0).fit(digits.data[train], digits.target[train])
    return clf, digits, val


def real_ceiling(clf, digits, val: list[int], resolution: int = 32) -> float:
    """Accuracy on held-out real digits after upscaling to `resolution` (as the shards store them) and
    reducing back: what a perfect generator would score."""
    from ldm.data.digits import digit_image

    images = [np.asarray(digit_image(digits.images[i], resolution)) for i in val]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return float((clf.predict(to_digit_features(x)) == digits.target[val]).mean())


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W floats in [0, 1] -> uint8, rounded as PNG files store them."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def generated_accuracy(
    pipe, clf, n: int, steps: int, sampler: str, guidance_scale: float, seed: int,
    keep: dict[int, torch.Tensor] | None = None,
) -> dict:  # fmt: skip
    """Sample n images of every digit with the prompt "a photo of the digit {word}" and classify them;
    `keep`, when given, receives label -> uint8 images."""
    per_digit, t0 = {}, time.perf_counter()
    for label, word in enumerate(WORDS):
        images = pipe(
            f"a photo of the digit {word}", num_images_per_prompt=n, steps=steps, sampler=sampler,
            guidance_scale=guidance_scale, seed=seed + 1000 * label, output="tensor",
        )  # fmt: skip
        per_digit[word] = float((clf.predict(to_digit_features(images.cpu())) == label).mean())
        if keep is not None:
            keep[label] = to_uint8(images.cpu())
        done, elapsed = label + 1, time.perf_counter() - t0  # progress on stderr: stdout holds the results
        print(f"digit {done}/{len(WORDS)} ({word}): accuracy {per_digit[word]:.2f}, {elapsed:.0f}s elapsed, "
              f"ETA {elapsed / done * (len(WORDS) - done):.0f}s", file=sys.stderr, flush=True)  # fmt: skip
    return per_digit


def heldout_by_class(resolution: int = 32, seed: int = 0) -> dict[int, torch.Tensor]:
    """Held-out real digits (the split `ldm.data.digits` leaves out) after the shards' upscaling, by label."""
    from ldm.eval.digits_features import digits_split, real_digit_images, split_images

    if seed == 0:
        images, labels = split_images("heldout", resolution)
    else:
        images, labels = real_digit_images(digits_split(seed)[1], resolution)
    return {c: images[labels == c] for c in range(10)}


@torch.no_grad()
def fid_kid(features, reference: torch.Tensor, images: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """FID and KID (torchmetrics) of uint8 `images` against uint8 `reference` in `features`' space; KID's
    random subsets are drawn from `seed`."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(100, len(images), len(reference))
    fid = FrechetInceptionDistance(feature=features)
    with warnings.catch_warnings():  # "KID keeps all features in memory": a few thousand x 64 here
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        kid = KernelInceptionDistance(feature=features, subsets=50, subset_size=size)
    for metric in (fid, kid):
        metric.update(reference, real=True)
        metric.update(images, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def digits_fid(generated: dict[int, torch.Tensor], resolution: int = 32, features=None) -> dict:
    """Digits FID / KID of generated digits (label -> uint8 images) against the training split's real
    digits, next to the held-out real digits' ("real vs real"), both at the same per-class counts:
    min(generated, held out) images of each class, so the two carry the same small-sample bias."""
    from ldm.eval.digits_features import DigitsFeatures, split_images

    features = features or DigitsFeatures()
    reference, _ = split_images("train", resolution)
    heldout = heldout_by_class(resolution)
    counts = {c: min(len(generated[c]), len(heldout[c])) for c in generated}
    fake = torch.cat([generated[c][: counts[c]] for c in sorted(counts)])
    real = torch.cat([heldout[c][: counts[c]] for c in sorted(counts)])
    return {
        "generated": fid_kid(features, reference, fake),
        "real_vs_real": fid_kid(features, reference, real),
        "images_per_set": int(len(fake)),
        "reference_images": int(len(reference)),
        "features": features.identity,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="anything ldm.load_pipeline reads (a run folder, its export, ...)")
    parser.add_argument("--n", type=int, default=20, help="images per digit")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's recommended, else 20")
    parser.add_argument("--sampler", default=None, help="default: the model's recommended, else dpmpp_2m")
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="default: the model's recommended, else 3"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fid", action="store_true", help="accuracy only")
    args = parser.parse_args(argv)

    import ldm

    clf, digits, val = fit_classifier()
    pipe = ldm.load_pipeline(args.ckpt)
    settings = pipe.sampling_settings(
        sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance_scale,
        fallback={"sampler": "dpmpp_2m", "steps": 20, "guidance_scale": 3.0},
    )  # fmt: skip
    generated: dict[int, torch.Tensor] = {}
    per_digit = generated_accuracy(
        pipe, clf, args.n, settings["steps"], settings["sampler"], settings["guidance_scale"], args.seed,
        keep=generated,
    )  # fmt: skip
    side = pipe.sample_size * pipe.vae.downsampling_factor
    result = {
        "accuracy": float(np.mean(list(per_digit.values()))),
        "real_heldout_accuracy": real_ceiling(clf, digits, val, side),
        "chance": 0.1,
        "per_digit": per_digit,
        "settings": dict(vars(args), **settings),
    }
    if not args.no_fid and args.n >= 2:
        result["digits_fid"] = digits_fid(generated, side)
    print("| digit | " + " | ".join(WORDS) + " | all |")
    print("|---" * 12 + "|")
    cells = " | ".join(f"{per_digit[w]:.2f}" for w in WORDS)
    print(f"| accuracy | {cells} | {result['accuracy']:.3f} |")
    print(f"real held-out digits through the same reduction: {result['real_heldout_accuracy']:.3f}")
    if "digits_fid" in result:
        d = result["digits_fid"]
        g, r = d["generated"], d["real_vs_real"]
        print(f"digits FID {g['fid']:.2f} (real vs real {r['fid']:.2f}), KID {g['kid']:.4f} (real vs real "
              f"{r['kid']:.4f}); {d['images_per_set']} images a set vs {d['reference_images']} training "
              f"digits, features {d['features']}")  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
