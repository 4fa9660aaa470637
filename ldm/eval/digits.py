"""Does a digits model draw the digit it is asked for? Accuracy of a classifier trained on real digits.

The classifier (scikit-learn SVC, RBF kernel) is fit on the training split of scikit-learn's 8x8 digits;
generated 32 px images are brought back to that format (grey, 8x8 by area averaging, 0-16 levels) and
classified. The same reduction applied to the held-out real digits, after their trip through the shard
writer's upscaling, gives the ceiling to compare with.

    python -m ldm.eval.digits CKPT [--n 20 --steps 20 --sampler dpmpp_2m --guidance-scale 3 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

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


@torch.no_grad()
def generated_accuracy(pipe, clf, n: int, steps: int, sampler: str, guidance_scale: float, seed: int) -> dict:
    """Sample n images of every digit with the prompt "a photo of the digit {word}" and classify them."""
    per_digit, t0 = {}, time.perf_counter()
    for label, word in enumerate(WORDS):
        images = pipe(
            f"a photo of the digit {word}", num_images_per_prompt=n, steps=steps, sampler=sampler,
            guidance_scale=guidance_scale, seed=seed + 1000 * label, output="tensor",
        )  # fmt: skip
        per_digit[word] = float((clf.predict(to_digit_features(images.cpu())) == label).mean())
        done, elapsed = label + 1, time.perf_counter() - t0  # progress on stderr: stdout holds the results
        print(f"digit {done}/{len(WORDS)} ({word}): accuracy {per_digit[word]:.2f}, {elapsed:.0f}s elapsed, "
              f"ETA {elapsed / done * (len(WORDS) - done):.0f}s", file=sys.stderr, flush=True)  # fmt: skip
    return per_digit


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="anything ldm.load_pipeline reads (a run folder, its export, ...)")
    parser.add_argument("--n", type=int, default=20, help="images per digit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import ldm

    clf, digits, val = fit_classifier()
    pipe = ldm.load_pipeline(args.ckpt)
    per_digit = generated_accuracy(
        pipe, clf, args.n, args.steps, args.sampler, args.guidance_scale, args.seed
    )
    side = pipe.sample_size * pipe.vae.downsampling_factor
    result = {
        "accuracy": float(np.mean(list(per_digit.values()))),
        "real_heldout_accuracy": real_ceiling(clf, digits, val, side),
        "chance": 0.1,
        "per_digit": per_digit,
        "settings": vars(args),
    }
    print("| digit | " + " | ".join(WORDS) + " | all |")
    print("|---" * 12 + "|")
    cells = " | ".join(f"{per_digit[w]:.2f}" for w in WORDS)
    print(f"| accuracy | {cells} | {result['accuracy']:.3f} |")
    print(f"real held-out digits through the same reduction: {result['real_heldout_accuracy']:.3f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
